#!/bin/sh
# WireGuard for the MPC links (CrypTen parties and the triples provider), one host at a time.
#
#   mpc-wg.sh keygen DIR            make this host's key pair in DIR (private.key stays here, 0600);
#                                   send DIR/public.key to the other MPC hosts
#   mpc-wg.sh up IFACE ADDR/PREFIX CONF
#                                   create IFACE (kernel WireGuard; or an interface that
#                                   wireguard-go already made), load CONF (wg(8) format, see
#                                   wg-mpc.conf.template), give it ADDR, bring it up
#   mpc-wg.sh down IFACE
#
# Then start `iomt cloud party|triples ... --mpc-interface IFACE`; the MPC master is party 0's
# tunnel address. Needs root, iproute2 and wireguard-tools.
set -eu

cmd=${1:-}
case "$cmd" in
keygen)
    dir=${2:?usage: mpc-wg.sh keygen DIR}
    mkdir -p "$dir"
    umask 077
    [ -e "$dir/private.key" ] && { echo "$dir/private.key exists; not overwriting" >&2; exit 1; }
    wg genkey > "$dir/private.key"
    wg pubkey < "$dir/private.key" > "$dir/public.key"
    echo "public key (give it to the other MPC hosts): $(cat "$dir/public.key")"
    ;;
up)
    iface=${2:?usage: mpc-wg.sh up IFACE ADDR/PREFIX CONF}
    addr=${3:?usage: mpc-wg.sh up IFACE ADDR/PREFIX CONF}
    conf=${4:?usage: mpc-wg.sh up IFACE ADDR/PREFIX CONF}
    if ! ip link show dev "$iface" >/dev/null 2>&1; then
        ip link add dev "$iface" type wireguard || {
            echo "this kernel has no WireGuard: start 'wireguard-go $iface' first" >&2; exit 1; }
    fi
    wg setconf "$iface" "$conf"
    ip address add "$addr" dev "$iface"
    ip link set dev "$iface" up
    wg show "$iface"
    ;;
down)
    ip link del dev "${2:?usage: mpc-wg.sh down IFACE}"
    ;;
*)
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 2
    ;;
esac

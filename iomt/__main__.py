from iomt.cli import main

raise SystemExit(main())

"""EHR records as FHIR R4 Bundles: Patient, LOINC-coded Observations and the diagnosis Condition.

We validate the subset of FHIR R4 the system reads (resource types, codings,
``valueQuantity``, ``Patient.gender``/``birthDate``) and let every other element through
untouched, so a bundle exported by an integration engine is accepted as long as the parts
we use are well formed. :func:`build_bundle` writes the bundles the simulators publish.
"""
from __future__ import annotations

import math
import re
from datetime import date, datetime, timezone

from protocols.errors import ProtocolError
from protocols.schema import CONDITIONS, EHR_FEATURES, LOINC_TO_FEATURE

LOINC = "http://loinc.org"
CONDITION_SYSTEM = "urn:iomt:condition"
UCUM = "http://unitsofmeasure.org"
MAX_ENTRIES = 1000
#: FHIR R4's ``id`` datatype (https://hl7.org/fhir/R4/datatypes.html#id); Bundle.id is the
#: record's natural id in the edge's store.
FHIR_ID = re.compile(r"[A-Za-z0-9.-]{1,64}")
_UNITS = {
    "age": "a", "heart_rate": "/min", "resp_rate": "/min", "body_temp": "Cel", "spo2": "%",
    "systolic_bp": "mm[Hg]", "diastolic_bp": "mm[Hg]", "wbc": "10*3/uL", "lactate": "mmol/L",
    "crp": "mg/L", "troponin": "ng/mL",
}


def _bad(detail: str) -> ProtocolError:
    return ProtocolError("bad_fhir", detail)


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float64 (a JSON integer may be far larger)."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _codings(resource: dict, where: str) -> list[dict]:
    code = resource.get("code")
    if not isinstance(code, dict) or not isinstance(code.get("coding"), list) or not code["coding"]:
        raise _bad(f"{where} needs code.coding")
    for c in code["coding"]:
        if not isinstance(c, dict) or not isinstance(c.get("code"), str):
            raise _bad(f"{where} has a coding without a string code")
    return code["coding"]


def validate_bundle(bundle: object, patient_id: str) -> None:
    """Raise :class:`ProtocolError` (reason ``bad_fhir``) unless ``bundle`` is usable."""
    if not isinstance(bundle, dict) or bundle.get("resourceType") != "Bundle":
        raise _bad("not a FHIR Bundle")
    if "id" in bundle and not (isinstance(bundle["id"], str) and FHIR_ID.fullmatch(bundle["id"])):
        raise _bad(f"Bundle.id {ascii(bundle['id'])[:80]} is not a FHIR id ({FHIR_ID.pattern})")
    if "timestamp" in bundle:
        try:
            datetime.fromisoformat(bundle["timestamp"])
        except (TypeError, ValueError) as err:
            raise _bad(f"Bundle.timestamp {ascii(bundle['timestamp'])[:80]}") from err
    entries = bundle.get("entry")
    if not isinstance(entries, list) or not entries or len(entries) > MAX_ENTRIES:
        raise _bad(f"Bundle.entry must be a list of 1-{MAX_ENTRIES} entries")
    patients = 0
    for i, entry in enumerate(entries):
        res = entry.get("resource") if isinstance(entry, dict) else None
        if not isinstance(res, dict) or not isinstance(res.get("resourceType"), str):
            raise _bad(f"entry {i} has no resource")
        kind = res["resourceType"]
        if kind == "Patient":
            patients += 1
            if res.get("id") != patient_id:
                raise _bad(f"Patient.id {res.get('id')!r} is not {patient_id!r}")
            if res.get("gender") not in (None, "male", "female", "other", "unknown"):
                raise _bad(f"Patient.gender {res.get('gender')!r}")
            if "birthDate" in res:
                try:
                    date.fromisoformat(str(res["birthDate"]))
                except ValueError as err:
                    raise _bad(f"Patient.birthDate {res['birthDate']!r}") from err
        elif kind == "Observation":
            _codings(res, f"Observation (entry {i})")
            if "valueQuantity" in res:
                vq = res["valueQuantity"]
                value = vq.get("value") if isinstance(vq, dict) else None
                if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value):
                    raise _bad(f"Observation (entry {i}) valueQuantity.value {ascii(value)[:80]}")
        elif kind == "Condition":
            coding = _codings(res, f"Condition (entry {i})")[0]
            if coding.get("system") == CONDITION_SYSTEM and coding["code"] not in CONDITIONS:
                raise _bad(f"unknown condition {coding['code']!r}")
    if patients != 1:
        raise _bad(f"Bundle needs exactly one Patient, has {patients}")


def _resources(bundle: dict, kind: str):
    for entry in bundle["entry"]:
        if entry["resource"]["resourceType"] == kind:
            yield entry["resource"]


def bundle_features(bundle: dict) -> dict[str, float]:
    """Feature name -> value for every schema feature the bundle carries."""
    out: dict[str, float] = {}
    patient = next(_resources(bundle, "Patient"))
    if patient.get("gender") in ("male", "female"):
        out["sex"] = 1.0 if patient["gender"] == "male" else 0.0
    for obs in _resources(bundle, "Observation"):
        value = obs.get("valueQuantity", {}).get("value")
        if value is None:
            continue
        for c in obs["code"]["coding"]:
            name = LOINC_TO_FEATURE.get(c["code"]) if c.get("system", LOINC) == LOINC else None
            if name:
                out[name] = float(value)
                break
    if "age" not in out and patient.get("birthDate"):
        ref = bundle.get("timestamp")
        when = datetime.fromisoformat(ref).date() if isinstance(ref, str) else datetime.now(timezone.utc).date()
        born = date.fromisoformat(patient["birthDate"])
        out["age"] = float(when.year - born.year - ((when.month, when.day) < (born.month, born.day)))
    return out


def bundle_condition(bundle: dict) -> str | None:
    """The diagnosis (one of CONDITIONS) the bundle's Condition carries, if any."""
    for cond in _resources(bundle, "Condition"):
        coding = cond["code"]["coding"][0]
        if coding.get("system") == CONDITION_SYSTEM:
            return coding["code"]
    return None


def build_bundle(patient_id: str, features: dict[str, float], condition: str | None = None,
                 ts: float | None = None) -> dict:
    """A FHIR R4 collection Bundle with the Patient, one Observation per feature and the Condition.

    ``features`` uses schema feature names; ``sex`` becomes Patient.gender.
    """
    when = datetime.fromtimestamp(ts if ts is not None else 0.0, tz=timezone.utc).isoformat()
    patient: dict = {"resourceType": "Patient", "id": patient_id}
    if "sex" in features:
        patient["gender"] = "male" if features["sex"] >= 0.5 else "female"
    entries = [{"fullUrl": f"urn:uuid:patient-{patient_id}", "resource": patient}]
    ref = {"reference": f"Patient/{patient_id}"}
    for name, value in features.items():
        code = EHR_FEATURES[name][0]
        if code is None:
            continue
        entries.append({"resource": {
            "resourceType": "Observation", "status": "final",
            "code": {"coding": [{"system": LOINC, "code": code, "display": name}]},
            "subject": ref, "effectiveDateTime": when,
            "valueQuantity": {"value": round(float(value), 4), "unit": _UNITS.get(name, "1"),
                              "system": UCUM, "code": _UNITS.get(name, "1")},
        }})
    if condition is not None:
        if condition not in CONDITIONS:
            raise ProtocolError("bad_fhir", f"unknown condition {condition!r}")
        entries.append({"resource": {
            "resourceType": "Condition", "subject": ref,
            "code": {"coding": [{"system": CONDITION_SYSTEM, "code": condition}]},
        }})
    return {"resourceType": "Bundle", "type": "collection", "timestamp": when, "entry": entries}

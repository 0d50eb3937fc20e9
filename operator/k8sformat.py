"""Kubernetes' own value formats, as the API server (k8s.io/apimachinery/pkg/util/validation, pkg/apis/core/validation)
and the kubelet check them: names, label keys and values, resource quantities, env var names, image references,
tolerations. Each check returns the error messages (empty: valid), worded as the API server words them.

The operator's spec parsing (operator/spec.py), its admission (`selflengthen operator validate`) and the test API
(tests/kube_admission.py) use these, so a value a cluster would refuse later is refused where it is written.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation

DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
DNS1123_SUBDOMAIN = rf"{DNS1123_LABEL}(\.{DNS1123_LABEL})*"
DNS1035_LABEL = r"[a-z]([-a-z0-9]*[a-z0-9])?"
QUALIFIED_NAME_PART = r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]"
LABEL_VALUE = r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?"
ENV_VAR_NAME = r"[-._a-zA-Z][-._a-zA-Z0-9]*"
IANA_SVC_NAME = r"[a-z0-9]([a-z0-9-]*[a-z0-9])?"
# resource.Quantity: <signedNumber><suffix>, suffix a binary SI (Ki..Ei), a decimal SI (n u m "" k M G T P E) or a
# decimal exponent (e|E<signedNumber>); a number is digits, digits.digits, digits. or .digits
QUANTITY = (r"[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)"
            r"([eE][+-]?[0-9]+|Ki|Mi|Gi|Ti|Pi|Ei|n|u|m|k|M|G|T|P|E)?")
NONNEGATIVE_QUANTITY = QUANTITY.replace("[+-]?", r"\+?", 1)
# A container image reference (github.com/distribution/reference): [host[:port]/]path[:tag][@digest]
_IMAGE_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*"
_IMAGE_HOST = r"(?:(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])(?:\.(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]))*|\[[0-9a-fA-F:]+\])(?::[0-9]+)?"  # noqa: E501
IMAGE_REFERENCE = (rf"(?:{_IMAGE_HOST}/)?{_IMAGE_COMPONENT}(?:/{_IMAGE_COMPONENT})*"
                   r"(?::[\w][\w.-]{0,127})?(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?")
TOLERATION_OPERATORS = ("Exists", "Equal")
TAINT_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

_SUFFIX = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60, "n": Decimal("1e-9"),
           "u": Decimal("1e-6"), "m": Decimal("1e-3"), "": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "P": 10**15, "E": 10**18}


def _full(pattern: str, value: str) -> bool:
    return re.fullmatch(pattern, value) is not None


def dns1123_label(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not _full(DNS1123_LABEL, value):
        out.append("a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must "
                   "start and end with an alphanumeric character")
    return out


def dns1123_subdomain(value: str) -> list[str]:
    out = []
    if len(value) > 253:
        out.append("must be no more than 253 characters")
    if not _full(DNS1123_SUBDOMAIN, value):
        out.append("a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', "
                   "and must start and end with an alphanumeric character")
    return out


def dns1035_label(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not _full(DNS1035_LABEL, value):
        out.append("a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an "
                   "alphabetic character, and end with an alphanumeric character")
    return out


def qualified_name(value: str) -> list[str]:
    """A label or annotation key, a nodeSelector key: [prefix/]name, prefix a DNS subdomain, name <= 63."""
    prefix, slash, name = value.rpartition("/")
    out = []
    if slash and not prefix:
        out.append("prefix part must be non-empty")
    elif prefix:
        out.extend(f"prefix part {m}" for m in dns1123_subdomain(prefix))
    if not name:
        out.append("name part must be non-empty")
    elif len(name) > 63:
        out.append("name part must be no more than 63 characters")
    if name and not _full(QUALIFIED_NAME_PART, name):
        out.append("name part must consist of alphanumeric characters, '-', '_' or '.', and must start and end "
                   "with an alphanumeric character")
    return out


def label_value(value: str) -> list[str]:
    out = []
    if len(value) > 63:
        out.append("must be no more than 63 characters")
    if not _full(LABEL_VALUE, value):
        out.append("a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', "
                   "and must start and end with an alphanumeric character")
    return out


def labels(mapping: dict) -> list[tuple[str, str]]:
    """(key, message) for each bad key or value of a label map (or a nodeSelector)."""
    out = []
    for key, value in mapping.items():
        out.extend((key, f"key {key!r}: {m}") for m in qualified_name(str(key)))
        if not isinstance(value, str):
            out.append((key, f"value of {key!r} must be a string"))
        else:
            out.extend((key, f"value {value!r}: {m}") for m in label_value(value))
    return out


def env_var_name(value: str) -> list[str]:
    if not value or not _full(ENV_VAR_NAME, value):
        return ["a valid environment variable name must consist of alphabetic characters, digits, '_', '-', or '.',"
                " and must not start with a digit"]
    return []


def parse_quantity(value: object) -> Decimal | None:
    """A resource.Quantity's value (int or string), or None when it is not one."""
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return Decimal(value)
    if not isinstance(value, str) or not _full(QUANTITY, value):
        return None
    m = re.fullmatch(r"([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))(.*)", value)
    if m is None:
        return None
    number, suffix = m.groups()
    try:
        if suffix not in _SUFFIX:  # a decimal exponent
            return Decimal(number) * (Decimal(10) ** int(suffix[1:]))
        return Decimal(number) * Decimal(_SUFFIX[suffix])
    except (InvalidOperation, KeyError, OverflowError):
        return None


def quantity(value: object, *, nonnegative: bool = True) -> list[str]:
    parsed = parse_quantity(value)
    if parsed is None:
        return ["quantities must match the regular expression "
                "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"]
    if nonnegative and parsed < 0:
        return ["must be greater than or equal to 0"]
    return []


def image_reference(value: str) -> list[str]:
    """What the kubelet refuses as InvalidImageName (the API server only refuses empty or padded images)."""
    if not value or value != value.strip():
        return ["must not be empty or have leading or trailing whitespace"]
    if len(value) > 4096 or not _full(IMAGE_REFERENCE, value):
        return ["must be a valid image reference ([registry[:port]/]repository[:tag][@digest], repository in "
                "lowercase)"]
    return []


def toleration(tol: dict) -> list[tuple[str, str]]:
    """(field, message) for a toleration the API server refuses."""
    out: list[tuple[str, str]] = []
    key, op = tol.get("key") or "", tol.get("operator") or "Equal"
    if key:
        out.extend(("key", m) for m in qualified_name(key))
    if op not in TOLERATION_OPERATORS:
        out.append(("operator", f"Unsupported value: {op!r}: supported values: \"Equal\", \"Exists\""))
    if not key and op != "Exists":
        out.append(("operator", "operator must be Exists when `key` is empty, which means \"match all values and "
                                "all keys\""))
    value = tol.get("value")
    if op == "Exists" and value:
        out.append(("value", "value must be empty when `operator` is 'Exists'"))
    elif value:
        out.extend(("value", m) for m in label_value(value))
    effect = tol.get("effect")
    if effect and effect not in TAINT_EFFECTS:
        out.append(("effect", f"Unsupported value: {effect!r}: supported values: \"NoSchedule\", "
                              "\"PreferNoSchedule\", \"NoExecute\""))
    if tol.get("tolerationSeconds") is not None and effect != "NoExecute":
        out.append(("effect", "effect must be 'NoExecute' when `tolerationSeconds` is set"))
    return out

"""The CRD's CEL rules checked as kube-apiserver checks them when the CRD is installed
(k8s.io/apiextensions-apiserver: structural schema, CEL compilation, cost estimation):

- every node that carries `x-kubernetes-validations` has a declared type (the server cannot declare `self` for an
  untyped node and refuses the whole CRD);
- every rule compiles and type-checks to a bool against the types derived from the schema, with Google's CEL
  (cel-expr-python, the C++ implementation with a type checker): objects become protobuf messages (proto2, so
  `has()` tests presence), maps `map(string, V)`, arrays `list(V)`, int-or-string and preserved unknown fields
  `dyn`, `format: date-time` strings timestamps; `oldSelf` has the type of `self`;
- every collection a rule iterates (`all`, `exists`, `exists_one`, `map`, `filter`, `in`) is bounded (maxItems or
  maxProperties), and the estimated cost of each rule, and of all together, stays inside the server's budgets.

The cost estimate (`rule_costs`) follows the shape of the server's estimator, not its exact numbers: a rule costs
1 per operator and comparison, plus for each string function (matches, startsWith, endsWith, contains, size)
ceil(0.1 x the string's maxLength) (x the pattern's length for matches), each comprehension multiplies its body's
cost by the iterated collection's bound, `self == oldSelf` costs the size of the value (its bounded strings and
collections), and the whole is multiplied by how many times the rule runs per object: the product of the
maxItems/maxProperties of the lists and maps above its node. An unbounded string counts as the largest request
the server takes (3 MiB); an unbounded collection makes the cost infinite. The server's budgets:
StaticEstimatedCostLimit 10,000,000 per rule, StaticEstimatedCRDCostLimit 100,000,000 per CRD.
"""

from __future__ import annotations

import keyword
import math
import re
from dataclasses import dataclass

PER_RULE_LIMIT = 10_000_000  # apiextensions-apiserver StaticEstimatedCostLimit
PER_CRD_LIMIT = 100_000_000  # StaticEstimatedCRDCostLimit
MAX_REQUEST_BYTES = 3 * 1024 * 1024  # what an unbounded string may hold (the request size limit)
CEL_RESERVED = {"true", "false", "null", "in", "as", "break", "const", "continue", "else", "for", "function", "if",
                "import", "let", "loop", "package", "namespace", "return", "var", "void", "while"}
_COMPREHENSION = re.compile(r"(self(?:\.\w+)*)\.(all|exists_one|exists|map|filter)\(")
_IN = re.compile(r"\bin\s+(self(?:\.\w+)+|self\b)")
_STRING_FUNCS = re.compile(r"\.(matches|startsWith|endsWith|contains|size|lowerAscii|upperAscii|split|replace)\(")


@dataclass
class Rule:
    path: str  # the node's path, e.g. spec.retry.stages
    rule: str
    node: dict
    cardinality: float  # how many times it runs per object


def _field_name(name: str) -> str:
    """A property name as CEL sees it (the server escapes reserved words and characters outside [a-zA-Z0-9_])."""
    if name in CEL_RESERVED or keyword.iskeyword(name):
        return f"__{name}__"
    out = name.replace("__", "__underscores__").replace(".", "__dot__").replace("-", "__dash__").replace(
        "/", "__slash__")
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", out):
        raise ValueError(f"property {name!r} has no CEL name")
    return out


def rules(schema: dict) -> list[Rule]:
    """Every x-kubernetes-validations rule, with its node and how often it runs per object."""
    out: list[Rule] = []

    def walk(node: dict, path: str, cardinality: float) -> None:
        for r in node.get("x-kubernetes-validations") or []:
            out.append(Rule(path or "<root>", r["rule"], node, cardinality))
        for name, sub in (node.get("properties") or {}).items():
            walk(sub, f"{path}.{name}" if path else name, cardinality)
        if isinstance(node.get("additionalProperties"), dict):
            walk(node["additionalProperties"], f"{path}{{}}", cardinality * node.get("maxProperties", math.inf))
        if isinstance(node.get("items"), dict):
            walk(node["items"], f"{path}[]", cardinality * node.get("maxItems", math.inf))

    walk(schema, "", 1)
    return out


# -- types --------------------------------------------------------------------------------------------------------


class _Types:
    """Protobuf messages for the schema's objects (one per node), and the CEL type of any node."""

    def __init__(self, root: dict):
        from google.protobuf import descriptor_pb2, descriptor_pool, struct_pb2, timestamp_pb2

        self.pb2 = descriptor_pb2
        self.file = descriptor_pb2.FileDescriptorProto(name="crd_types.proto", package="crd", syntax="proto2")
        self.file.dependency.extend(["google/protobuf/struct.proto", "google/protobuf/timestamp.proto"])
        self.names: dict[int, str] = {}
        self.count = 0
        self.root = root
        self._message(root, is_root=True)
        self.pool = descriptor_pool.DescriptorPool()
        for dep in (struct_pb2, timestamp_pb2):
            self.pool.AddSerializedFile(dep.DESCRIPTOR.serialized_pb)
        self.pool.Add(self.file)

    def _message(self, node: dict, is_root: bool = False) -> str:
        if id(node) in self.names:
            return self.names[id(node)]
        self.count += 1
        name = f"Node{self.count}"
        self.names[id(node)] = f"crd.{name}"
        msg = self.file.message_type.add(name=name)
        props = dict(node.get("properties") or {})
        if is_root:  # the server declares only these of metadata for rules on the root
            props["metadata"] = {"type": "object", "properties": {
                "name": {"type": "string", "maxLength": 253}, "generateName": {"type": "string", "maxLength": 253}}}
        for number, (prop, sub) in enumerate(props.items(), start=1):
            self._field(msg, f"crd.{name}", _field_name(prop), number, sub)
        return f"crd.{name}"

    def _scalar(self, node: dict):
        F = self.pb2.FieldDescriptorProto
        t = node.get("type")
        if node.get("x-kubernetes-int-or-string") or (node.get("x-kubernetes-preserve-unknown-fields")
                                                     and not node.get("properties")) or t is None:
            return F.TYPE_MESSAGE, ".google.protobuf.Value"
        if t == "string" and node.get("format") in ("date-time", "date"):
            return F.TYPE_MESSAGE, ".google.protobuf.Timestamp"
        simple = {"string": F.TYPE_STRING, "integer": F.TYPE_INT64, "number": F.TYPE_DOUBLE, "boolean": F.TYPE_BOOL}
        if t in simple:
            return simple[t], None
        if t == "object" and isinstance(node.get("additionalProperties"), dict):
            return None, None  # a map: handled by the caller
        if t == "object" and node.get("properties"):
            return F.TYPE_MESSAGE, "." + self._message(node)
        if t == "object":
            return F.TYPE_MESSAGE, ".google.protobuf.Struct"
        if t == "array":
            return F.TYPE_MESSAGE, ".google.protobuf.ListValue"  # a list of lists: dyn elements
        raise ValueError(f"no CEL type for {node}")

    def _field(self, msg, msg_name: str, name: str, number: int, node: dict) -> None:
        F = self.pb2.FieldDescriptorProto
        t = node.get("type")
        if t == "array" and isinstance(node.get("items"), dict) and node["items"].get("type") != "array" and not (
                node["items"].get("type") == "object" and isinstance(node["items"].get("additionalProperties"), dict)):
            ftype, type_name = self._scalar(node["items"])
            field = msg.field.add(name=name, number=number, type=ftype, label=F.LABEL_REPEATED)
        elif t == "object" and isinstance(node.get("additionalProperties"), dict) and \
                node["additionalProperties"].get("type") not in ("array",) and not (
                node["additionalProperties"].get("type") == "object"
                and isinstance(node["additionalProperties"].get("additionalProperties"), dict)):
            camel = "".join(part[:1].upper() + part[1:] for part in name.split("_"))
            entry = msg.nested_type.add(name=f"{camel}Entry")  # protobuf's required name of a map's entry
            entry.options.map_entry = True
            entry.field.add(name="key", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
            vtype, vname = self._scalar(node["additionalProperties"])
            value = entry.field.add(name="value", number=2, type=vtype, label=F.LABEL_OPTIONAL)
            if vname:
                value.type_name = vname
            field = msg.field.add(name=name, number=number, type=F.TYPE_MESSAGE, label=F.LABEL_REPEATED,
                                  type_name=f".{msg_name}.{entry.name}")
            return
        else:
            ftype, type_name = self._scalar(node)
            if ftype is None:
                ftype, type_name = F.TYPE_MESSAGE, ".google.protobuf.Struct"
            field = msg.field.add(name=name, number=number, type=ftype, label=F.LABEL_OPTIONAL)
        if type_name:
            field.type_name = type_name

    def cel_type(self, node: dict, is_root: bool = False):
        from cel_expr_python import cel

        if is_root:
            return cel.Type(self.names[id(self.root)])
        t = node.get("type")
        if node.get("x-kubernetes-int-or-string") or t is None:
            return cel.Type.DYN
        if t == "string":
            return cel.Type.TIMESTAMP if node.get("format") in ("date-time", "date") else cel.Type.STRING
        if t == "integer":
            return cel.Type.INT
        if t == "number":
            return cel.Type.DOUBLE
        if t == "boolean":
            return cel.Type.BOOL
        if t == "array":
            return cel.Type.List(self.cel_type(node.get("items") or {}))
        if isinstance(node.get("additionalProperties"), dict):
            return cel.Type.Map(cel.Type.STRING, self.cel_type(node["additionalProperties"]))
        if node.get("properties"):
            return cel.Type(self._lookup(node))
        return cel.Type.Map(cel.Type.STRING, cel.Type.DYN)

    def _lookup(self, node: dict) -> str:
        return self.names[id(node)]


def compile_errors(root: dict) -> list[str]:
    """Why the server would refuse the CRD's rules at install: untyped nodes, rules that do not compile or are not
    bool."""
    from cel_expr_python import cel

    errors = []
    found = rules(root)
    for r in found:
        if "type" not in r.node and not r.node.get("x-kubernetes-int-or-string"):  # int-or-string: dyn
            errors.append(f"{r.path}: x-kubernetes-validations on a node without a declared type: the API server "
                          "cannot declare `self` for it")
    if errors:
        return errors
    types = _Types(root)
    envs: dict[int, object] = {}
    for r in found:
        env = envs.get(id(r.node))
        if env is None:
            t = types.cel_type(r.node, is_root=r.node is root)
            env = envs[id(r.node)] = cel.NewEnv(descriptor_pool=types.pool, variables={"self": t, "oldSelf": t})
        try:
            expression = env.compile(r.rule)
        except Exception as exc:  # the compiler's message names the position and the types
            errors.append(f"{r.path}: rule {r.rule!r} does not compile: {str(exc).splitlines()[0]}")
            continue
        if expression.return_type() != cel.Type.BOOL:
            errors.append(f"{r.path}: rule {r.rule!r} is {expression.return_type().name()}, not bool")
    return errors


# -- cost -----------------------------------------------------------------------------------------------------------


def _resolve(node: dict, path: str) -> dict | None:
    """The schema node of `self.a.b` relative to `node`."""
    for part in path.split(".")[1:]:
        node = (node.get("properties") or {}).get(part)
        if node is None:
            return None
    return node


def _bound(node: dict) -> float:
    if node.get("type") == "array":
        return node.get("maxItems", math.inf)
    if node.get("type") == "object":
        return node.get("maxProperties", math.inf)
    return math.inf


def _size(node: dict) -> float:
    """How much an equality over the value walks: strings by length/10, collections by bound x element."""
    t = node.get("type")
    if t == "string":
        return math.ceil(0.1 * node.get("maxLength", MAX_REQUEST_BYTES))
    if t == "array":
        return _bound(node) * _size(node.get("items") or {})
    if t == "object" and isinstance(node.get("additionalProperties"), dict):
        return _bound(node) * (1 + _size(node["additionalProperties"]))
    if t == "object":
        return 1 + sum(_size(sub) for sub in (node.get("properties") or {}).values())
    return 1


def unbounded_iterations(r: Rule) -> list[str]:
    out = []
    for m in [*_COMPREHENSION.finditer(r.rule), *_IN.finditer(r.rule)]:
        target = _resolve(r.node, m.group(1))
        if target is not None and target.get("type") in ("array", "object") and math.isinf(_bound(target)):
            out.append(f"{r.path}: rule {r.rule!r} iterates {m.group(1)}, which has no "
                       f"{'maxItems' if target.get('type') == 'array' else 'maxProperties'}")
    if math.isinf(r.cardinality):
        out.append(f"{r.path}: rule {r.rule!r} sits under a list or map without maxItems/maxProperties")
    return out


def rule_cost(r: Rule) -> float:
    """The estimated cost of one rule over one object (see the module's docstring)."""
    ops = len(re.findall(r"==|!=|<=|>=|<|>|&&|\|\||!|\+|-|\bin\b|has\(", r.rule)) + 1
    cost = float(ops)
    # strings the rule reads: self (a string node) or self.field
    for m in _STRING_FUNCS.finditer(r.rule):
        before = r.rule[: m.start()]
        target_path = re.search(r"(self(?:\.\w+)*)$", before)
        target = _resolve(r.node, target_path.group(1)) if target_path else None
        length = (target or {}).get("maxLength", MAX_REQUEST_BYTES) if (target or {}).get("type") == "string" \
            else 256  # a comprehension variable: its element's length is counted by the loop below
        unit = math.ceil(0.1 * length)
        if m.group(1) == "matches":
            pattern = re.search(r"matches\('([^']*)'\)", r.rule[m.start():])
            unit *= max(len(pattern.group(1)) if pattern else 64, 1)
        cost += unit
    for m in _COMPREHENSION.finditer(r.rule):
        target = _resolve(r.node, m.group(1))
        bound = _bound(target) if target is not None else math.inf
        element = (target.get("items") or target.get("additionalProperties") or {}) if target else {}
        key_length = 253 if target is not None and target.get("type") == "object" else element.get("maxLength", 1)
        cost += bound * (ops + math.ceil(0.1 * key_length) * 16)
    if "oldSelf" in r.rule and "==" in r.rule:
        cost += _size(r.node)
    return cost * r.cardinality


def rule_costs(root: dict) -> list[tuple[str, str, float]]:
    """(path, rule, estimated cost) of every rule, most expensive first."""
    return sorted(((r.path, r.rule, rule_cost(r)) for r in rules(root)), key=lambda x: -x[2])


def install_errors(root: dict) -> list[str]:
    """Everything the API server would refuse the CRD's validation rules for."""
    errors = compile_errors(root)
    found = rules(root)
    for r in found:
        errors.extend(unbounded_iterations(r))
    total = 0.0
    for path, rule, cost in rule_costs(root):
        total += cost
        if cost > PER_RULE_LIMIT:
            errors.append(f"{path}: rule {rule!r}: estimated cost {cost:g} exceeds the per-rule budget "
                          f"{PER_RULE_LIMIT:,}")
    if total > PER_CRD_LIMIT:
        errors.append(f"the rules' estimated cost {total:g} exceeds the per-CRD budget {PER_CRD_LIMIT:,}")
    return errors

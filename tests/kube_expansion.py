"""The kubelet's `$(VAR)` expansion of container command, args and env values, byte for byte as Kubernetes'
third_party/forked/golang/expansion/expand.go does it (Expand, tryReadVariableName, MappingFuncFor), and the
environment a container gets (kubelet's makeEnvironmentVariables: each env value expanded with the variables
defined before it and the service variables).

Go indexes strings by byte: `$` followed by a multi-byte character yields `$` plus that first byte read as a
rune, exactly what `string(input[0])` does there; this module does the same on UTF-8 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

OPERATOR, OPENER, CLOSER = ord("$"), ord("("), ord(")")

# kubelet always sets the master service's variables, also with enableServiceLinks: false.
SERVICE_ENV = {"KUBERNETES_SERVICE_HOST": "10.0.0.1", "KUBERNETES_SERVICE_PORT": "443",
               "KUBERNETES_PORT": "tcp://10.0.0.1:443"}


def mapping_func_for(*contexts: Mapping[str, str]) -> Callable[[bytes], bytes]:
    def mapping(name: bytes) -> bytes:
        key = name.decode("utf-8", "surrogateescape")
        for variables in contexts:
            if key in variables:
                return variables[key].encode("utf-8", "surrogateescape")
        return b"$(" + name + b")"  # syntaxWrap: an unknown variable stays as written

    return mapping


def _try_read_variable_name(data: bytes) -> tuple[bytes, bool, int]:
    first = data[0]
    if first == OPERATOR:  # escaped operator
        return data[0:1], False, 1
    if first == OPENER:
        for i in range(1, len(data)):
            if data[i] == CLOSER:
                return data[1:i], True, i + 1
        return b"$(", False, 1  # incomplete reference
    return b"$" + chr(first).encode("utf-8"), False, 1  # string(input[0]): the byte as a rune


def expand(text: str, mapping: Callable[[bytes], bytes]) -> str:
    data = text.encode("utf-8", "surrogateescape")
    out = bytearray()
    checkpoint = 0
    cursor = 0
    while cursor < len(data):
        if data[cursor] == OPERATOR and cursor + 1 < len(data):
            out += data[checkpoint:cursor]
            read, is_var, advance = _try_read_variable_name(data[cursor + 1:])
            out += mapping(read) if is_var else read
            cursor += advance
            checkpoint = cursor + 1
        cursor += 1
    out += data[checkpoint:]
    return out.decode("utf-8", "surrogateescape")


def container_environment(container: dict, value_from: Callable[[dict], str]) -> dict[str, str]:
    """The container's variables as the kubelet makes them: valueFrom resolved by `value_from(var)`, each
    literal value expanded with the variables before it and the service variables."""
    env: dict[str, str] = {}
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = expand(var["value"], mapping_func_for(env, SERVICE_ENV))
        elif "valueFrom" in var:
            env[var["name"]] = value_from(var)
        else:
            env[var["name"]] = ""
    return env


def expanded_argv(container: dict, env: Mapping[str, str]) -> list[str]:
    """command + args after the kubelet's expansion (ExpandContainerCommandAndArgs)."""
    mapping = mapping_func_for(env, SERVICE_ENV)
    return [expand(a, mapping) for a in (*container.get("command", []), *container.get("args", []))]

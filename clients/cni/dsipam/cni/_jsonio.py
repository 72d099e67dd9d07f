"""JSON in and out without importing ``json`` (whose decoder pulls in ``re``, ~7 ms per run).

The C accelerator ``_json`` that ``json`` itself uses does the scanning; a small encoder
writes the plugin's output. Falls back to ``json`` where ``_json`` is missing.
"""

try:
    import _json
except ImportError:  # pragma: no cover - CPython always has it
    _json = None  # type: ignore[assignment]


def _reject_constant(name: str) -> object:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:20]} is out of range")
    return value


class _Context:
    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = staticmethod(_finite_float)
    parse_int = int
    parse_constant = staticmethod(_reject_constant)
    memo: dict = {}


_WHITESPACE = " \t\n\r"


MAX_DEPTH = 512


def _check(value: object) -> object:
    """Refuses what the compiled plugin's decoder cannot keep (clients/cni/go): nesting deeper
    than MAX_DEPTH, and a string with a lone surrogate (``"\\ud800"``), which is not text."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("a string with a lone surrogate") from None
        elif isinstance(item, (dict, list)):
            if depth > MAX_DEPTH:
                raise ValueError(f"nested deeper than {MAX_DEPTH}")
            children = [*item.keys(), *item.values()] if isinstance(item, dict) else item
            stack.extend((child, depth + 1) for child in children)
    return value


def loads(text: str) -> object:
    """Parses one JSON document (surrounding whitespace allowed); raises ValueError otherwise."""
    return _check(_loads(text))


def _loads(text: str) -> object:
    if _json is not None:
        start = len(text) - len(text.lstrip(_WHITESPACE))
        try:
            value, end = _json.make_scanner(_Context())(text, start)  # type: ignore[arg-type]
            if not text[end:].strip(_WHITESPACE):
                return value
        except Exception:  # noqa: BLE001 - the scanner reports errors only once json.decoder is loaded
            pass
    # Invalid input (or no accelerator): let json say exactly what is wrong.
    import json

    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("nested too deeply") from None


def dumps(value: object) -> str:
    """Serializes dicts, lists, strings, ints, floats, booleans and None, ASCII-only."""
    if isinstance(value, str):
        return _json.encode_basestring_ascii(value) if _json is not None else _quote(value)
    if value is True:
        return "true"
    if value is False:
        return "false"
    if value is None:
        return "null"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ", ".join(f"{dumps(str(k))}: {dumps(v)}" for k, v in value.items()) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(dumps(v) for v in value) + "]"
    raise TypeError(f"cannot serialize {type(value).__name__}")


def _quote(text: str) -> str:  # pragma: no cover - only without _json
    import json

    return json.dumps(text)

"""The layout issue 9 set, checked on the source so that it stays: mitmproxy's internals only
behind ``aibridgeproxyd/mitm/``, no reaching into another module's private attributes, thin
addon hooks (15 lines) and short addon methods (20 lines), one addon per file, no addon
importing another. Reads the files (``ast``); imports nothing of the project."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "aibridgeproxyd"
ADDONS = ROOT / "addons"
WALL = PACKAGE / "mitm"

# mitmproxy's event hooks (``mitmproxy.hooks.all_hooks`` once every layer is imported).
HOOKS = frozenset(
    {
        "add_log",
        "client_connected",
        "client_disconnected",
        "configure",
        "dns_error",
        "dns_request",
        "dns_response",
        "done",
        "error",
        "http_connect",
        "http_connect_error",
        "http_connect_upstream",
        "http_connected",
        "load",
        "next_layer",
        "quic_start_client",
        "quic_start_server",
        "request",
        "requestheaders",
        "response",
        "responseheaders",
        "running",
        "server_connect",
        "server_connect_error",
        "server_connected",
        "server_disconnected",
        "socks5_auth",
        "tcp_end",
        "tcp_error",
        "tcp_message",
        "tcp_start",
        "tls_clienthello",
        "tls_established_client",
        "tls_established_server",
        "tls_failed_client",
        "tls_failed_server",
        "tls_start_client",
        "tls_start_server",
        "udp_end",
        "udp_error",
        "udp_message",
        "udp_start",
        "update",
        "websocket_end",
        "websocket_message",
        "websocket_start",
    }
)
MAX_HOOK_LINES = 15
MAX_METHOD_LINES = 20

# What code outside the mitm package may import of mitmproxy: the addon API, and two public
# utility modules (listed, with their users, in aibridgeproxyd/mitm/__init__.py).
PUBLIC_MITMPROXY = frozenset(
    {
        "mitmproxy.connection",
        "mitmproxy.ctx",
        "mitmproxy.exceptions",
        "mitmproxy.hooks",
        "mitmproxy.http",
        "mitmproxy.tls",
        "mitmproxy.net.http.url",
        "mitmproxy.net.server_spec",
    }
)


def _sources(*roots: Path) -> Iterator[tuple[str, ast.Module]]:
    for root in roots:
        for path in sorted(root.rglob("*.py")):
            if WALL in path.parents:
                continue
            yield str(path.relative_to(ROOT)), ast.parse(path.read_text(), str(path))


def _proxy_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name == "mitmproxy.proxy" or alias.name.startswith("mitmproxy.proxy."):
                    yield node.lineno, f"import {alias.name}"
        elif isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "mitmproxy.proxy" or node.module.startswith("mitmproxy.proxy."):
                yield node.lineno, f"from {node.module} import ..."
            elif node.module == "mitmproxy" and any(a.name == "proxy" for a in node.names):
                yield node.lineno, "from mitmproxy import proxy"


def _mitmproxy_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Each name imported from mitmproxy, dotted: ``from mitmproxy.http import Headers`` as
    ``mitmproxy.http.Headers``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "mitmproxy":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mitmproxy":
            for alias in node.names:
                yield node.lineno, f"{node.module}.{alias.name}"


def _is_public_mitmproxy(name: str) -> bool:
    return any(name == module or name.startswith(f"{module}.") for module in PUBLIC_MITMPROXY)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def _private_names_defined(tree: ast.Module) -> set[str]:
    """Private names a module defines for its own classes: methods, class attributes and
    attributes set on ``self``/``cls``. Python's privacy is per module: code in the module
    that defines ``_name`` may use it on any object of its classes."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef):
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    names.add(item.name)
                elif isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                    names.add(item.target.id)
                elif isinstance(item, ast.Assign):
                    names.update(t.id for t in item.targets if isinstance(t, ast.Name))
        elif (
            isinstance(node, ast.Attribute)
            and isinstance(node.ctx, ast.Store)
            and isinstance(node.value, ast.Name)
            and node.value.id in ("self", "cls")
        ):
            names.add(node.attr)
    return {name for name in names if _is_private(name)}


def _foreign_private_accesses(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Every ``<expr>._name`` read or write (or ``getattr(<expr>, "_name")``) where ``<expr>`` is not ``self``/``cls`` and
    ``_name`` is not one this module defines: a private of mitmproxy, pyOpenSSL or another of
    our modules."""
    own = _private_names_defined(tree)
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Name)
            and node.func.id in ("getattr", "setattr", "hasattr", "delattr")
            and len(node.args) >= 2
            and isinstance(node.args[1], ast.Constant)
            and isinstance(node.args[1].value, str)
            and _is_private(node.args[1].value)
            and node.args[1].value not in own
        ):
            yield node.lineno, ast.unparse(node)
        if not isinstance(node, ast.Attribute) or not _is_private(node.attr):
            continue
        if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
            continue
        if node.attr in own:
            continue
        yield node.lineno, ast.unparse(node)


def _private_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """``from <one of our modules> import _name``: another module's private name."""
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        ours = node.level > 0 or (node.module or "").split(".")[0] in ("aibridgeproxyd", "addons")
        for alias in node.names:
            if ours and _is_private(alias.name):
                yield node.lineno, f"from {'.' * node.level}{node.module or ''} import {alias.name}"


def _addon_classes(tree: ast.Module) -> Iterator[ast.ClassDef]:
    """Classes with at least one mitmproxy hook method: the addons a file defines."""
    for node in tree.body:
        if isinstance(node, ast.ClassDef) and any(
            isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and item.name in HOOKS
            for item in node.body
        ):
            yield node


def test_only_the_mitm_package_imports_mitmproxy_proxy() -> None:
    found = [
        f"{path}:{line}: {text}"
        for path, tree in _sources(PACKAGE, ADDONS)
        for line, text in _proxy_imports(tree)
    ]
    assert found == [], "mitmproxy.proxy is used only inside aibridgeproxyd/mitm/"


def test_outside_the_mitm_package_only_the_addon_api_and_listed_utilities_are_imported() -> None:
    found = [
        f"{path}:{line}: {module}"
        for path, tree in _sources(PACKAGE, ADDONS)
        for line, module in _mitmproxy_imports(tree)
        if not _is_public_mitmproxy(module)
    ]
    assert found == [], "list a new public module in mitm/__init__.py and PUBLIC_MITMPROXY"


def test_no_private_attribute_of_another_module_is_used_outside_the_mitm_package() -> None:
    found = [
        f"{path}:{line}: {text}"
        for path, tree in _sources(PACKAGE, ADDONS)
        for line, text in _foreign_private_accesses(tree)
    ]
    assert found == [], "private attributes of mitmproxy, pyOpenSSL or another module"


def test_no_module_imports_a_private_name_of_another() -> None:
    """Everywhere, the mitm package included: a name shared between modules is public."""
    found = [
        f"{path.relative_to(ROOT)}:{line}: {text}"
        for root in (PACKAGE, ADDONS)
        for path in sorted(root.rglob("*.py"))
        for line, text in _private_imports(ast.parse(path.read_text(), str(path)))
    ]
    assert found == [], "a private name imported from another module"


def test_the_private_attribute_check_sees_what_it_should() -> None:
    tree = ast.parse(
        "class A:\n"
        "    def _own(self): self._x = 1\n"
        "def f(a, flow, layer):\n"
        "    a._own(); a._x\n"
        "    flow.client_conn._state\n"
        "    layer._handle_event = None\n"
        "    a.__class__\n"
        "    getattr(flow, '_layer', None)\n"
    )
    assert [text for _, text in _foreign_private_accesses(tree)] == [
        "flow.client_conn._state",
        "layer._handle_event",
        "getattr(flow, '_layer', None)",
    ]


def test_addon_hooks_are_thin() -> None:
    """A hook translates the event into a call on the domain code; the decision lives there."""
    long_hooks = [
        f"{path}: {cls.name}.{item.name} has {length} lines"
        for path, tree in _sources(ADDONS)
        for cls in _addon_classes(tree)
        for item in cls.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
        and item.name in HOOKS
        and (length := (item.end_lineno or item.lineno) - item.lineno + 1) > MAX_HOOK_LINES
    ]
    assert long_hooks == [], f"hooks over {MAX_HOOK_LINES} lines (signature and body)"


def _type_checking_blocks(tree: ast.Module) -> set[ast.AST]:
    """The statements under ``if TYPE_CHECKING:``: imports for annotations, never run."""
    return {
        statement
        for node in ast.walk(tree)
        if isinstance(node, ast.If)
        and isinstance(node.test, ast.Name)
        and node.test.id == "TYPE_CHECKING"
        for statement in node.body
    }


def _addon_imports(tree: ast.Module) -> Iterator[tuple[int, str]]:
    """Imports of a module of ``addons/`` (relative, ``addons.x`` or ``aibridgeproxyd.addons.x``)
    that run: an import for annotations only (under ``TYPE_CHECKING``) is not one."""
    type_only = _type_checking_blocks(tree)
    for node in ast.walk(tree):
        if node in type_only:
            continue
        if isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if (
                node.level > 0
                or module.split(".")[0] == "addons"
                or module.startswith("aibridgeproxyd.addons")
            ):
                yield node.lineno, f"from {'.' * node.level}{module} import ..."
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "addons" or alias.name.startswith(
                    "aibridgeproxyd.addons"
                ):
                    yield node.lineno, f"import {alias.name}"


def test_no_addon_imports_another_addon_module() -> None:
    """Addons share code through the domain (``aibridgeproxyd``) or ``aibridgeproxyd/mitm/``,
    never through each other: each file of ``addons/`` can be read, and changed, alone."""
    found = [
        f"{path}:{line}: {text}"
        for path, tree in _sources(ADDONS)
        for line, text in _addon_imports(tree)
    ]
    assert found == [], "an addon module imports another addon module"


def test_addon_methods_are_short_private_helpers_too() -> None:
    """Every method of an addon class, hooks and private helpers alike, is at most
    ``MAX_METHOD_LINES`` (20) lines, signature and docstring included: moving a hook's decision
    into a private helper of the addon does not make the addon thin; the decision belongs in
    the domain (``aibridgeproxyd/``), where unit tests call it without a proxy. Constructors
    (``__init__``) are left out: they only store their configuration, and their length is
    their parameter list."""
    long_methods = [
        f"{path}: {cls.name}.{item.name} has {length} lines"
        for path, tree in _sources(ADDONS)
        for cls in _addon_classes(tree)
        for item in cls.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
        and item.name != "__init__"
        and (length := (item.end_lineno or item.lineno) - item.lineno + 1) > MAX_METHOD_LINES
    ]
    assert long_methods == [], f"addon methods over {MAX_METHOD_LINES} lines"


def test_each_addon_file_defines_one_addon() -> None:
    crowded = {
        path: [cls.name for cls in classes]
        for path, tree in _sources(ADDONS)
        if len(classes := list(_addon_classes(tree))) > 1
    }
    assert crowded == {}, "one addon (one concern) per file in addons/"


def test_addon_module_functions_are_short_too() -> None:
    """A module-level function in ``addons/`` is held to ``MAX_METHOD_LINES`` like a method: a
    decision moved out of a hook into a function beside it is still in the addon."""
    long_functions = [
        f"{path}: {item.name} has {length} lines"
        for path, tree in _sources(ADDONS)
        for item in tree.body
        if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef))
        and (length := (item.end_lineno or item.lineno) - item.lineno + 1) > MAX_METHOD_LINES
    ]
    assert long_functions == [], f"addon module functions over {MAX_METHOD_LINES} lines"


def test_addon_hooks_are_defined_not_assigned() -> None:
    """``requestheaders = _helper`` in a class body would escape the hook-length check."""
    assigned = [
        f"{path}: {cls.name}.{target.id}"
        for path, tree in _sources(ADDONS)
        for cls in (node for node in ast.walk(tree) if isinstance(node, ast.ClassDef))
        for item in cls.body
        if isinstance(item, ast.Assign)
        for target in item.targets
        if isinstance(target, ast.Name) and target.id in HOOKS
    ]
    assert assigned == [], "hooks assigned in a class body"


def test_no_body_is_decoded_by_mitmproxy() -> None:
    """mitmproxy's ``get_content``/``get_text`` decode a body in one call, with no bound on the
    output (a few kilobytes of zstd decode to gigabytes) and any Python codec a header names;
    bodies are decoded by ``content_coding.decode_bounded`` or ``usage.BodyDecoder``."""
    found = [
        f"{path.relative_to(ROOT)}:{node.lineno}: {node.attr}"
        for root in (PACKAGE, ADDONS)
        for path in sorted(root.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
        if isinstance(node, ast.Attribute) and node.attr in ("get_content", "get_text")
    ]
    assert found == []

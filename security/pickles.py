"""An experiment's pickles, read without running them and loaded so that only reviewed source runs.

OpenFL ships the notebook's model, optimizer, data interface, tasks, aggregation functions and task assigner as
cloudpickles. A pickle is a program: loading it calls whatever callables it names, and cloudpickle rebuilds the
notebook's functions and classes from bytecode it carries. So a node that approved an experiment's source
(review.py) would still run what the pickles say, not what it read. Here:

- `references(data)`: every global a pickle names and every module it imports, found by running its opcodes
  on symbols: nothing is imported, called or built. These go into the code hash and the review.
- `load(path, source)`: the node's loader, in place of cloudpickle.load, once an experiment is approved. It
  resolves only the globals the review listed and the node allows (HELPERS, which rebuild functions, classes
  and tensors; classes of the model, optimizer, interface and torch families; the archive's modules; names the
  reviewed source imports), and while loading calls only classes and HELPERS, never a function; tensors'
  nested pickles load only as weights (torch.load(weights_only=True)). Every function
  it rebuilds must have the code that the reviewed source compiles to for that name, on this node's Python: a
  notebook cell of the review, a module of the archive, or an installed module; it then runs the code compiled
  here from that source. Every global such a function sees must be what the reviewed source binds that name
  to (its imports and definitions; other names only to data), and every class must be a reviewed class
  statement with its reviewed bases and methods. Anything else is Refused, naming it, before any of it runs.

What still comes from the pickles is data: the initial weights, arguments, attributes, and which allowed object
a value is. Code that treats a value as code (a task's `privacy` argument is an object whose methods run) runs
the methods the reviewed source or the node's libraries define for that object's class.
"""
from __future__ import annotations

import ast
import builtins
import importlib
import importlib.util
import io
import itertools
import pickle
import sys
import types
from dataclasses import dataclass, field
from pathlib import Path

from .signing import Refused

CLOUDPICKLE = "cloudpickle.cloudpickle"
# What rebuilding objects needs, and nothing that runs other code: cloudpickle's helpers for functions, classes
# and cells, pickle's for objects, torch's for tensors.
HELPERS = {
    CLOUDPICKLE: {"_make_function", "_function_setstate", "_make_skeleton_class", "_class_setstate", "_make_cell",
                  "_make_empty_cell", "_builtin_type", "subimport", "_make_dict_keys", "_make_dict_values",
                  "_make_dict_items"},
    "copyreg": {"_reconstructor", "__newobj__", "__newobj_ex__"},
    "torch._utils": {"_rebuild_tensor_v2", "_rebuild_parameter", "_rebuild_parameter_with_state"},
    "torch.storage": {"_load_from_bytes"},
    "collections": {"OrderedDict", "defaultdict"},
    "builtins": {"type", "object", "dict", "list", "set", "frozenset", "tuple", "property", "staticmethod", "int",
                 "float", "str", "bool", "bytes", "classmethod", "slice", "complex", "bytearray"},
    "abc": {"ABCMeta"},
    "numpy": {"dtype", "ndarray"},
    "numpy.core.multiarray": {"_reconstruct", "scalar"},
    "numpy._core.multiarray": {"_reconstruct", "scalar"},
    "numpy.core.numeric": {"_frombuffer"},
    "numpy._core.numeric": {"_frombuffer"},  # numpy 2's arrays (a server optimizer's state)
}
# Not FunctionType: a function is made only by _make_function, whose code is checked first.
BUILTIN_TYPES = {"CodeType", "MethodType", "CellType", "MappingProxyType", "SimpleNamespace"}
# What cloudpickle's _function_setstate may set of a rebuilt function: never its code.
FUNCTION_STATE = {"__name__", "__qualname__", "__annotations__", "__kwdefaults__", "__defaults__", "__module__",
                  "__doc__", "__closure__", "__globals__", "_cloudpickle_submodules", "__type_params__"}
# What a rebuilt class may hold before its state is set (cloudpickle's _class_getnewargs gives these at most).
SKELETON_KEYS = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "__slots__"}
# Classes whose construction only builds a model, an optimizer, an OpenFL interface or a torch value.
CLASS_FAMILIES = ("torch.nn.", "torch.optim.", "torch.autograd.grad_mode.", "torch.utils._contextlib.",
                  "openfl.interface.", "openfl.component.assigner.tasks", "openfl.utilities.optimizers.")
CELL_MODULES = ("__main__", "__notebook__")  # where the notebook's own functions and classes say they live


# --- reading a pickle without running it -------------------------------------------------------------------
class _Symbol:
    """What a pickle would build, unbuilt: a global it names, or a call of one."""

    def __init__(self, scan: _Scan, what: tuple):
        self.scan, self.what = scan, what

    def __call__(self, *args):
        if self.what[0] == "global" and args and isinstance(args[0], str):
            if self.what[1:] == (CLOUDPICKLE, "subimport"):
                self.scan.imports.add(args[0])
            elif self.what[1:] == (CLOUDPICKLE, "_builtin_type"):
                self.scan.uses.add(("types", args[0]))
        return _Symbol(self.scan, ("call", self, args))

    def __setstate__(self, state):
        pass

    def __setitem__(self, key, value):
        pass

    def append(self, value):
        pass

    extend = add = update = append

    def __hash__(self):
        return id(self)


class _Scan(pickle._Unpickler):
    """pickle's own opcode machine, with every global a symbol: it builds nothing and imports nothing."""

    def __init__(self, data: bytes):
        super().__init__(io.BytesIO(data))
        self.uses: set[tuple[str, str]] = set()
        self.imports: set[str] = set()

    def find_class(self, module, name):
        self.uses.add((module, name))
        return _Symbol(self, ("global", module, name))

    def persistent_load(self, pid):
        raise pickle.UnpicklingError("it refers to objects outside itself (persistent ids)")

    def load_newobj(self):
        args = self.stack.pop()
        self.stack[-1] = _Symbol(self, ("new", self.stack[-1], args))

    def load_newobj_ex(self):
        kwargs, args = self.stack.pop(), self.stack.pop()
        self.stack[-1] = _Symbol(self, ("new", self.stack[-1], args, kwargs))

    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex


def references(data: bytes) -> tuple[set[tuple[str, str]], set[str]]:
    """(the (module, name) globals a pickle names, the modules it imports), read without running anything;
    Refused if it cannot be read."""
    scan = _Scan(data)
    try:
        scan.load()
    except Exception as exc:  # a pickle that pickle's own machine cannot follow is not one to run
        raise Refused(f"a pickle of it cannot be read ({type(exc).__name__}: {exc})") from None
    return scan.uses, scan.imports


# --- the reviewed source, compiled on this node ---------------------------------------------------------------
@dataclass
class Source:
    """The code an approved experiment may run: its notebook cells, its archive's modules (folder: where the
    archive was unpacked), and what its pickles may name (the review's uses and imports)."""

    cells: list[str]
    folder: Path
    uses: set[tuple[str, str]]
    imports: set[str]
    _codes: dict = field(default_factory=dict, repr=False)  # origin: {qualname: [code]}
    _bindings: dict | None = field(default=None, repr=False)
    _classes: dict | None = field(default=None, repr=False)

    def codes(self, origin: str) -> dict[str, list[types.CodeType]]:
        """Code objects by qualname, compiled here from one origin: "cells" or a module name."""
        if origin not in self._codes:
            found: dict[str, list[types.CodeType]] = {}
            for text, name in self._texts(origin):
                _collect(compile(text, name, "exec", dont_inherit=True), found)
            self._codes[origin] = found
        return self._codes[origin]

    def _texts(self, origin: str) -> list[tuple[str, str]]:
        if origin == "cells":
            return [(text, f"<reviewed cell {n}>") for n, text in enumerate(self.cells, start=1)]
        path = self.module_file(origin)
        if path is None:
            raise Refused(f"a function of module {origin} has no source on this node to check it against")
        return [(path.read_text(), str(path))]

    def module_file(self, module: str) -> Path | None:
        """The source file of a module: the archive's, else the one installed on this node."""
        parts = module.split(".")
        for candidate in (self.folder.joinpath(*parts).with_suffix(".py"), self.folder.joinpath(*parts, "__init__.py")):
            if candidate.is_file():
                return candidate
        try:
            spec = importlib.util.find_spec(module)
        except (ImportError, ValueError):
            return None
        origin = getattr(spec, "origin", None)
        return Path(origin) if origin and origin.endswith(".py") else None

    def bindings(self) -> dict[str, list[tuple]]:
        """What the cells bind each global name to: ("import", module, attribute or None), ("def", qualname) or
        ("value",)."""
        if self._bindings is None:
            self._bindings, self._classes = bound_names(self.cells)
        return self._bindings

    def class_statement(self, qualname: str) -> ast.ClassDef | None:
        self.bindings()
        return self._classes.get(qualname)


def _collect(code: types.CodeType, found: dict) -> None:
    found.setdefault(code.co_qualname, []).append(code)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            _collect(const, found)


def bound_names(cells: list[str]) -> tuple[dict[str, list[tuple]], dict[str, ast.ClassDef]]:
    """(what the cells bind each global name to, their class statements by qualname); see Source.bindings."""
    names, classes = {}, {}
    for text in cells:
        _bind(ast.parse(text).body, names, classes, prefix="")
    return names, classes


def names_read(code: types.CodeType) -> set[str]:
    """The names a function's code (and the code nested in it) looks up: its globals among them."""
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= names_read(const)
    return names


def _bind(body: list, names: dict, classes: dict, prefix: str) -> None:
    """Record the names a module's statements bind (not inside functions), and its class statements."""
    for node in body:
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname:
                    names.setdefault(alias.asname, []).append(("import", alias.name, None))
                else:
                    top = alias.name.split(".")[0]
                    names.setdefault(top, []).append(("import", top, None))
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                names.setdefault(alias.asname or alias.name, []).append(("import", node.module, alias.name))
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            names.setdefault(node.name, []).append(("def", prefix + node.name))
        elif isinstance(node, ast.ClassDef):
            names.setdefault(node.name, []).append(("def", prefix + node.name))
            classes[prefix + node.name] = node
            _bind(node.body, {}, classes, prefix + node.name + ".")
        else:
            for target in ast.walk(node):
                if isinstance(target, ast.Name) and isinstance(target.ctx, ast.Store):
                    names.setdefault(target.id, []).append(("value",))
            for child in ast.iter_child_nodes(node):  # statements nested in if/for/with/try blocks
                if isinstance(child, ast.stmt):
                    _bind([child], names, classes, prefix)


# --- loading, checked ---------------------------------------------------------------------------------------
def _name(module: str, name: str) -> str:
    return f"{module}.{name}"


class _Loader(pickle._Unpickler):
    """pickle's own loader (in Python, so that each step can be checked) that resolves only reviewed, allowed
    globals, calls only classes among them and the rebuilding helpers (never another function, nor one the pickle
    made), and keeps what it rebuilds for the checks."""

    def __init__(self, file, source: Source, made: dict):
        super().__init__(file)
        self.source, self.made = source, made
        self.resolved: set[int] = set()  # the classes and helpers find_class gave: all that a pickle may call

    def persistent_load(self, pid):
        raise Refused("a pickle of it refers to objects outside itself (persistent ids)")

    def find_class(self, module, name):
        obj = self._find(module, name)
        if isinstance(obj, type) or name in HELPERS.get(module, ()):
            self.resolved.add(id(obj))  # a class, or a rebuilding helper: what a pickle may call as it loads
        return obj

    def _find(self, module, name):
        if (module, name) not in self.source.uses:
            raise Refused(f"a pickle of it names {_name(module, name)}, which its review does not list")
        if module == CLOUDPICKLE and name in HELPERS[CLOUDPICKLE]:
            return _checked_helper(name, self.source, self.made, self.resolved)
        if (module, name) == ("torch.storage", "_load_from_bytes"):
            return _weights_only
        if name in HELPERS.get(module, ()):
            return _resolve(module, name)
        obj = _resolve(module, name)
        if _allowed(module, name, obj, self.source):
            return obj
        raise Refused(f"a pickle of it calls or names {_name(module, name)}, which this node does not let an "
                      "experiment's objects reach (only the model, optimizer and interface classes, and what its "
                      "reviewed source imports)")

    def _callable(self, obj, how: str):
        if id(obj) not in self.resolved and obj not in self.made["classes"]:
            raise Refused(f"a pickle of it {how} {getattr(obj, '__qualname__', type(obj).__name__)} while it loads: "
                          "it may build objects of the classes its review lists, never call a function")

    def load_reduce(self):
        self._callable(self.stack[-2], "calls")
        super().load_reduce()

    def load_newobj(self):
        self._callable(self.stack[-2], "builds a")
        super().load_newobj()

    def load_newobj_ex(self):
        self._callable(self.stack[-3], "builds a")
        super().load_newobj_ex()

    def load_build(self):
        if isinstance(self.stack[-2], (types.FunctionType, type)):
            raise Refused("a pickle of it sets a function's or a class's attributes directly")
        super().load_build()

    def load_inst(self):
        raise Refused("a pickle of it uses protocol 0's INST, which this node does not load")

    load_obj = load_inst
    dispatch = dict(pickle._Unpickler.dispatch)
    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.INST[0]] = load_inst
    dispatch[pickle.OBJ[0]] = load_obj


def _resolve(module: str, name: str):
    try:
        obj = importlib.import_module(module)
        for part in name.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as exc:
        raise Refused(f"a pickle of it names {_name(module, name)}, which this node does not have ({exc})") from None
    return obj


def _allowed(module: str, name: str, obj, source: Source) -> bool:
    """Whether a global that is no rebuilding helper may be reached: the archive's own (reviewed) code; what the
    reviewed cells import under that name; a class of the model, optimizer, interface and torch families, or a
    method of one; a torch or numpy value (a dtype)."""
    path = source.module_file(module)
    if path is not None and path.resolve().is_relative_to(source.folder.resolve()):
        return True
    for bound in source.bindings().get(name.split(".")[-1], []):
        if bound[0] == "import" and _same(bound, obj):
            return True
    owner = obj if isinstance(obj, type) else _resolve(module, name.rsplit(".", 1)[0]) if "." in name else None
    if isinstance(owner, type) and _family(owner):
        return True
    return module.split(".")[0] in ("torch", "numpy") and not callable(obj) and not isinstance(obj, types.ModuleType)


def _family(cls: type) -> bool:
    torch = _torch()
    return f"{cls.__module__}.{cls.__qualname__}".startswith(CLASS_FAMILIES) or issubclass(
        cls, (torch.nn.Module, torch.optim.Optimizer, torch.Tensor, torch.dtype, torch.device, torch.Size))


def _torch():
    import torch

    return torch


def _same(bound: tuple, obj) -> bool:
    try:
        return _imported(bound) is obj
    except Refused:
        return False


def _imported(bound: tuple):
    """The object an import binding of the reviewed cells gives on this node."""
    _, module, attribute = bound
    try:
        imported = importlib.import_module(module)
        if attribute is None:
            return imported
        try:
            return getattr(imported, attribute)
        except AttributeError:
            return importlib.import_module(f"{module}.{attribute}")
    except ImportError as exc:
        raise Refused(f"its reviewed source imports {module}, which this node does not have ({exc})") from None


def _weights_only(data: bytes):
    """torch.storage._load_from_bytes, for weights only: a tensor's nested pickle can hold nothing else."""
    return _torch().load(io.BytesIO(data), weights_only=True)


def _checked_helper(name: str, source: Source, made: dict, resolved: set):
    """cloudpickle's rebuilding helper `name`, checking what it rebuilds as it does: a function's code when it is
    made, a class's methods and attributes when its state is set."""
    import cloudpickle.cloudpickle as cp

    if name == "_builtin_type":
        def builtin_type(type_name):
            if type_name not in BUILTIN_TYPES:
                raise Refused(f"a pickle of it builds a types.{type_name}, which this node does not allow")
            found = getattr(types, type_name)
            resolved.add(id(found))
            return found

        return builtin_type
    if name == "subimport":
        def subimport(module):
            if module not in source.imports:
                raise Refused(f"a pickle of it imports {module}, which its review does not list")
            return importlib.import_module(module)

        return subimport
    if name == "_make_function":
        def make_function(code, globals_, name_, argdefs, closure):
            if not isinstance(code, types.CodeType) or not isinstance(globals_, dict):
                raise Refused(f"a pickle of it makes function {name_} from something other than code")
            trusted, _ = _reviewed_code(code, str(globals_.get("__name__") or ""), code.co_qualname, source)
            function = cp._make_function(trusted, globals_, name_, argdefs, closure)
            made["functions"].append(function)
            return function

        return make_function
    if name == "_make_skeleton_class":
        def make_class(type_constructor, name_, bases, type_kwargs, class_tracker_id, extra):
            if type_constructor not in (type, _abc_meta()):
                raise Refused(f"a pickle of it builds class {name_} with metaclass {type_constructor!r}")
            if not set(type_kwargs) <= SKELETON_KEYS:
                raise Refused(f"a pickle of it builds class {name_} with {sorted(set(type_kwargs) - SKELETON_KEYS)}")
            # Built fresh, never looked up by its tracker id: a class an earlier experiment left in this process
            # must not stand in for this one's.
            cls = types.new_class(name_, bases, {"metaclass": type_constructor},
                                  lambda namespace: namespace.update(type_kwargs))
            made["classes"].append(cls)
            return cls

        return make_class
    if name == "_function_setstate":
        def function_setstate(obj, state):
            if obj not in made["functions"] or not isinstance(state, tuple) or len(state) != 2 or \
                    not set(state[1]) <= FUNCTION_STATE:
                raise Refused("a pickle of it sets what a function is made of, not only its names and values")
            return cp._function_setstate(obj, state)

        return function_setstate
    if name == "_class_setstate":
        def class_setstate(obj, state):
            if obj not in made["classes"]:
                raise Refused("a pickle of it sets the attributes of a class it did not build")
            result = cp._class_setstate(obj, state)
            _check_class(obj, source, made["functions"])  # before any instance of it is built with these
            return result

        return class_setstate
    return getattr(cp, name)


def _abc_meta():
    import abc

    return abc.ABCMeta


def load(path: Path, source: Source):
    """The object pickled at `path`, loaded as the module docstring says; Refused, naming what, if anything in it
    is not what the reviewed source defines. Nothing it rebuilt has run when this raises."""
    made: dict[str, list] = {"functions": [], "classes": []}
    with open(path, "rb") as file:
        try:
            obj = _Loader(file, source, made).load()
        except Refused:
            raise
        except Exception as exc:
            raise Refused(f"{Path(path).name} cannot be loaded under review ({type(exc).__name__}: {exc})") from None
    for function in made["functions"]:
        _check_function(function, source)
    for cls in made["classes"]:
        _check_class(cls, source, made["functions"])
    return obj


def _origin(module: str, source: Source) -> str:
    if module in CELL_MODULES or source.module_file(module) is None:
        return "cells"
    return module


def _reviewed_code(code: types.CodeType, module: str, qualname: str, source: Source) -> tuple[types.CodeType, str]:
    """(the code compiled on this node from the reviewed source that equals `code`, where: "cells" or a module):
    found under its module, or for a wrapper (functools.wraps' function under another's name) in the modules the
    review lists; Refused if there is none."""
    claimed = _origin(module, source)
    listed = sorted({m for m, _ in source.uses} | source.imports)
    for origin in itertools.chain([claimed], (m for m in listed if m != claimed and
                                              _may_define(source, m, code.co_name))):
        matches = [c for c in source.codes(origin).get(code.co_qualname, []) if c == code]
        if matches:
            return matches[0], origin
    where = "the notebook's reviewed cells" if claimed == "cells" else f"module {claimed}"
    raise Refused(f"its function {qualname} is not the code that {where} define for it on this node's Python "
                  f"{sys.version_info.major}.{sys.version_info.minor}: it was changed, or compiled elsewhere")


def _check_function(function: types.FunctionType, source: Source) -> None:
    """A rebuilt function, once loaded: its code compiled here from its reviewed source (checked when it was
    made, and again), and its globals what that source binds them to."""
    qualname = function.__qualname__
    function.__code__, origin = _reviewed_code(function.__code__, function.__module__ or "", qualname, source)
    code = function.__code__
    if function.__globals__.get("__builtins__") not in (builtins, builtins.__dict__):
        raise Refused(f"its function {qualname} comes with builtins of its own")
    for name in names_read(code):
        if name not in function.__globals__ or name.startswith("__"):
            continue
        value = function.__globals__[name]
        if origin == "cells":
            _check_cell_global(qualname, name, value, source)
        else:
            expected = getattr(importlib.import_module(origin), name, _MISSING)
            if expected is not value:
                raise Refused(f"its function {qualname} sees {name} bound to something other than module {origin} "
                              "binds it to")


_MISSING = object()


def _may_define(source: Source, module: str, name: str) -> bool:
    """Whether a module's source could define a function of this name (read before compiling it)."""
    path = source.module_file(module)
    return path is not None and f"def {name}(" in path.read_text()


def _check_cell_global(qualname: str, name: str, value, source: Source) -> None:
    """A global a cell function reads must be what the cells bind that name to."""
    bound = source.bindings().get(name)
    if not bound:
        if name in dir(builtins):
            raise Refused(f"its function {qualname} sees the built-in {name} rebound")
        raise Refused(f"its function {qualname} reads {name}, which its reviewed cells do not define")
    for binding in bound:
        if binding[0] == "import" and _same(binding, value):
            return
        if binding[0] == "def" and getattr(value, "__qualname__", None) == binding[1] and \
                getattr(value, "__module__", None) in CELL_MODULES:
            return  # a function or class rebuilt from the cells: checked on its own
        if binding[0] == "value" and not (callable(value) or isinstance(value, types.ModuleType)):
            return
    what = getattr(value, "__qualname__", None) or type(value).__name__
    raise Refused(f"its function {qualname} sees {name} bound to {what}, not to what its reviewed cells bind it to")


DUNDERS = {"__module__", "__qualname__", "__doc__", "__dict__", "__weakref__", "_abc_impl", "__annotations__",
           "__slotnames__", "__static_attributes__", "__firstlineno__", "__orig_bases__", "__parameters__",
           "__slots__", "__classcell__"}


def _check_class(cls: type, source: Source, functions: list) -> None:
    """A class rebuilt from the cells must be a reviewed class statement: its bases and its methods."""
    statement = source.class_statement(cls.__qualname__)
    if cls.__module__ not in CELL_MODULES or statement is None:
        raise Refused(f"its class {cls.__qualname__} (module {cls.__module__}) is no class statement of its "
                      "reviewed cells")
    bases = [_evaluate(base, source) for base in statement.bases] or [object]
    if list(cls.__bases__) != bases:
        raise Refused(f"its class {cls.__qualname__} has other base classes than its reviewed cells give it")
    defined = {n.name for n in statement.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assigned = {t.id for n in statement.body if isinstance(n, (ast.Assign, ast.AnnAssign))
                for t in ast.walk(n) if isinstance(t, ast.Name) and isinstance(t.ctx, ast.Store)}
    rebuilt = {id(f) for f in functions}
    for attribute, value in vars(cls).items():
        if attribute in DUNDERS:
            continue
        parts = [value.fget, value.fset, value.fdel] if isinstance(value, property) else \
            [value.__func__] if isinstance(value, (staticmethod, classmethod)) else [value]
        parts = [p for p in parts if p is not None]
        if attribute in defined and all(id(p) in rebuilt and p.__qualname__ == f"{cls.__qualname__}.{attribute}"
                                        for p in parts):
            continue
        if attribute in assigned and not any(callable(p) for p in parts):
            continue
        raise Refused(f"its class {cls.__qualname__} has a {attribute} that its reviewed cells do not define")


def _evaluate(expression: ast.expr, source: Source):
    """A base class as the reviewed cells name it (a name or a dotted attribute), resolved on this node."""
    if isinstance(expression, ast.Attribute):
        return getattr(_evaluate(expression.value, source), expression.attr)
    if isinstance(expression, ast.Name):
        for binding in source.bindings().get(expression.id, []):
            if binding[0] == "import":
                return _imported(binding)
        if hasattr(builtins, expression.id):
            return getattr(builtins, expression.id)
    raise Refused(f"a reviewed class's base {ast.unparse(expression)} cannot be checked")

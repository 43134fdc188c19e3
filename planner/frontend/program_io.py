"""The staged program as a JSON document: built once (on meta), bound to each worker's own model.

A run's workers do not trace: the launcher (or `podplan run --job-dir`) compiles the model on the
meta device through the stage-split pipeline and writes `program.json` beside the job; a worker
reads it and rebinds every stage to its seeded (or checkpoint-filled) model by module path, so the
stage modules hold the model's real weights.

The document is data, never code (job directories are shared artefacts): nodes list op, name,
target, args and kwargs as tagged JSON values; a call_function target is resolved through an
allow-list of pure tensor/operator functions, a call_method target must be a public torch.Tensor
method, and a module or weight reference must name a module, parameter or buffer of the model.
Anything else is refused with one line (ConfigError) naming it.

Kept per node: the podplan metadata the runtime and the staged lint read (role, layer, module,
stage, stage_layer). Not kept: node costs and the graph-level cuts / phases / schedule (planning
facts no worker reads). The routed-experts stages are wrapped in ExpertShards on load by the
pipeline's own 'expert-decompose' transform, which also restores the program's expert table.
"""

from __future__ import annotations

import functools

import json
import keyword
import math
import operator
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.fx as fx
import torch.nn as nn
import torch.nn.functional as F

from passes import get_pass, get_pipeline, meta
from passes.context import PassContext
from passes.expert_decompose import ExpertShard, expert_decompose
from passes.kv_cache import cached_positions
from passes.manager import verify
from planner.frontend.errors import ConfigError
from planner.frontend.shape import shape_of_model
from planner.frontend.stages import PIPELINE, StagedProgram, staged_program
from planner.frontend.trace import CausalLMRoot, Traced, build_model, podplan_causal_mask, trace_model
from planner.frontend.zoo import ModelSource, load_source

if TYPE_CHECKING:  # transformers is imported lazily, by build_model; types only here
    from transformers import PreTrainedModel

FORMAT = "podplan-staged-program"
VERSION = 1
PROGRAM_FILE = "program.json"  # beside job.json in a run's job directory

# Node metadata kept in the document: short name -> podplan key.
_META = {"role": meta.ROLE, "layer": meta.LAYER, "module": meta.MODULE, "stage": meta.STAGE,
         "stage_layer": meta.STAGE_LAYER}
# Graph-level metadata a rebuilt program carries (what verify and stage_calls read).
_GRAPH_META = (meta.STAGED, meta.KV_INPUTS)
# The signature of the rebuilt program's PassContext (not used to run: the graph is shape-generic).
_BATCH, _SEQ = 1, 2


# --- the allow-list of call_function targets ------------------------------------------------------

_BUILTINS = {f.__name__: f for f in (getattr, len, int, float, bool, min, max, abs)}
_MASKS = {podplan_causal_mask.__name__: podplan_causal_mask}
_KV = {cached_positions.__name__: cached_positions}
# torch functions that touch files or compile code are not tensor math
_TORCH_DENY = frozenset({"load", "save", "from_file", "compile", "jit", "hub", "classes", "ops", "library"})
# operator's higher-order functions would call whatever a getattr reached
_OPERATOR_DENY = frozenset({"call", "attrgetter", "itemgetter", "methodcaller"})


def _namespaces() -> dict[str, object]:
    return {"operator": operator, "builtins": _BUILTINS, "math": math, "torch": torch,
            "torch.nn.functional": F, "torch._C._nn": torch._C._nn, "torch.Tensor": torch.Tensor,
            "planner.frontend.trace": _MASKS, "passes.kv_cache": _KV}


def _lookup(space: object, name: str) -> object:
    return space.get(name) if isinstance(space, dict) else getattr(space, name, None)


def _allowed(ns: str, name: str, fn: object) -> bool:
    """Whether `fn` (found as ns:name) is pure computation on tensors and numbers."""
    if not callable(fn) or name.startswith("_") or isinstance(fn, type) and ns not in ("builtins",):
        return False
    if ns == "torch":
        # torch's own kernels are builtins; Python-level torch functions are allowed only from
        # torch.functional (einsum, split, ...), which is all tensor math
        return name not in _TORCH_DENY and (type(fn).__name__ == "builtin_function_or_method"
                                             or getattr(fn, "__module__", "") == "torch.functional")
    if ns == "operator":
        return name not in _OPERATOR_DENY
    if ns == "math":
        return type(fn).__name__ == "builtin_function_or_method"
    return True


def _function_name(fn: Callable) -> str:
    """'namespace:name' of an allowed call_function target; ConfigError if it is not on the list."""
    name = getattr(fn, "__name__", "")
    for ns, space in _namespaces().items():
        if _lookup(space, name) is fn and _allowed(ns, name, fn):
            return f"{ns}:{name}"
    raise ConfigError(f"the staged program calls {getattr(fn, '__module__', '?')}.{name or fn!r}, which the program "
                      "document cannot name; allowed are operator, torch, torch.nn.functional and podplan's mask helpers")


def _function(ref: object, where: str) -> Callable:
    ns, _, name = ref.partition(":") if isinstance(ref, str) else ("", "", "")
    space = _namespaces().get(ns)
    fn = None if space is None or not name else _lookup(space, name)
    if fn is None or not _allowed(ns, name, fn):
        raise ConfigError(f"{where}: call target {ref!r} is not on podplan's allow-list of tensor functions; "
                          f"write {PROGRAM_FILE} again with `podplan run PLAN --job-dir`")
    assert callable(fn)
    return fn


# --- values ---------------------------------------------------------------------------------------


def _encode(value: object) -> object:
    """A node argument as JSON; containers and non-JSON scalars are tagged one-key objects."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return {"float": repr(value)}
    if isinstance(value, fx.Node):
        return {"node": value.name}
    if isinstance(value, torch.Size):
        return {"size": [int(d) for d in value]}
    if isinstance(value, tuple):
        return {"tuple": [_encode(v) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v) for v in value]}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise ConfigError(f"the staged program has a dict argument with non-string keys {list(value)!r}")
        return {"dict": {k: _encode(v) for k, v in value.items()}}
    if isinstance(value, slice):
        return {"slice": [_encode(value.start), _encode(value.stop), _encode(value.step)]}
    if value is Ellipsis:
        return {"ellipsis": True}
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": str(value)}
    raise ConfigError(f"the staged program has an argument of type {type(value).__name__} ({value!r}), which the "
                      "program document cannot hold")


def _decode(value: object, env: dict[str, fx.Node], where: str) -> object:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if not (isinstance(value, dict) and len(value) == 1):
        raise ConfigError(f"{where}: argument {value!r} is not a podplan program value; write {PROGRAM_FILE} again")
    (tag, body), = value.items()
    if tag == "node" and body in env:
        return env[body]
    if tag in ("tuple", "list") and isinstance(body, list):
        items = [_decode(v, env, where) for v in body]
        return tuple(items) if tag == "tuple" else items
    if tag == "dict" and isinstance(body, dict):
        return {str(k): _decode(v, env, where) for k, v in body.items()}
    if tag == "slice" and isinstance(body, list) and len(body) == 3:
        start, stop, step = (_decode(v, env, where) for v in body)
        return slice(start, stop, step)
    if tag == "ellipsis" and body is True:
        return Ellipsis
    if tag == "float" and isinstance(body, str):
        try:
            return float(body)
        except ValueError:
            pass
    if tag == "size" and isinstance(body, list) and all(isinstance(d, int) for d in body):
        return torch.Size(body)
    if tag == "dtype" and isinstance(body, str) and isinstance(getattr(torch, body, None), torch.dtype):
        return getattr(torch, body)
    if tag == "device" and isinstance(body, str):
        try:
            return torch.device(body)
        except RuntimeError:
            pass
    raise ConfigError(f"{where}: argument {value!r} is not a podplan program value (unknown tag or a reference to a "
                      f"node not defined before it); write {PROGRAM_FILE} again")


# --- graphs ---------------------------------------------------------------------------------------


def _node_doc(node: fx.Node) -> dict:
    target: object = node.target
    if node.op == "call_function":
        assert callable(node.target)
        target = _function_name(node.target)
    return {"op": node.op, "name": node.name, "target": str(target), "args": _encode(tuple(node.args)),
            "kwargs": _encode(dict(node.kwargs)),
            "meta": {short: node.meta[key] for short, key in _META.items() if key in node.meta}}


def _identifier(name: object, what: str, where: str) -> str:
    # names become Python identifiers in the code torch.fx generates for the graph
    if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name) or name.startswith("__"):
        raise ConfigError(f"{where}: {what} {name!r} is not a plain identifier; write {PROGRAM_FILE} again")
    return name


def _graph(nodes: object, where: str, *, methods: frozenset[str]) -> fx.Graph:
    """Rebuild a graph from its node list, checking every name, target and value."""
    if not isinstance(nodes, list):
        raise ConfigError(f"{where}: 'nodes' must be a list; write {PROGRAM_FILE} again")
    graph = fx.Graph()
    env: dict[str, fx.Node] = {}
    for doc in nodes:
        if not isinstance(doc, dict):
            raise ConfigError(f"{where}: node {doc!r} is not an object; write {PROGRAM_FILE} again")
        op, name, target = doc.get("op"), doc.get("name"), doc.get("target")
        at = f"{where} node {name!r}"
        _identifier(name, "node name", where)
        args = _decode(doc.get("args"), env, at)
        kwargs = _decode(doc.get("kwargs"), env, at)
        if not isinstance(args, tuple) or not isinstance(kwargs, dict):
            raise ConfigError(f"{at}: args must be a tuple and kwargs a dict; write {PROGRAM_FILE} again")
        for key in kwargs:
            _identifier(key, "keyword", at)
        fx_target: object
        if op == "call_function":
            fx_target = _function(target, at)
            if fx_target is getattr and not (len(args) == 2 and isinstance(args[1], str) and not args[1].startswith("_")):
                raise ConfigError(f"{at}: getattr of {args[1:]!r}; only public attributes are read")
        elif op == "call_method":
            if not isinstance(target, str) or target.startswith("_") or target not in methods:
                raise ConfigError(f"{at}: method {target!r} is not a public torch.Tensor method")
            fx_target = target
        elif op in ("placeholder", "call_module", "get_attr"):
            fx_target = _identifier(target, f"{op} target", at)
        elif op == "output":
            fx_target = "output"
        else:
            raise ConfigError(f"{at}: unknown op {op!r}; write {PROGRAM_FILE} again")
        node = graph.create_node(op, fx_target, args, kwargs, name=name)
        if node.name != name:
            raise ConfigError(f"{at}: the name is used twice; write {PROGRAM_FILE} again")
        node_meta = doc.get("meta", {})
        if not isinstance(node_meta, dict) or any(k not in _META or not isinstance(v, (str, int, type(None)))
                                                  for k, v in node_meta.items()):
            raise ConfigError(f"{at}: metadata {node_meta!r} is not podplan's; write {PROGRAM_FILE} again")
        node.meta.update({_META[k]: v for k, v in node_meta.items()})
        env[name] = node
    return graph


def _named(root: nn.Module) -> Iterator[tuple[str, object]]:
    """(qualified name, object) for every module, parameter and buffer under `root`, shared ones repeated."""
    yield from root.named_modules(remove_duplicate=False)
    yield from root.named_parameters(remove_duplicate=False)
    yield from root.named_buffers(remove_duplicate=False)


def _paths(root: nn.Module) -> dict[int, str]:
    """Object id -> qualified name of every module, parameter and buffer under `root` (first name wins)."""
    out: dict[int, str] = {}
    for name, obj in _named(root):
        out.setdefault(id(obj), name)
    return out


def _targets(root: nn.Module) -> dict[str, object]:
    """Qualified name -> module, parameter or buffer: the only things a stage may refer to."""
    out: dict[str, object] = {}
    for name, obj in _named(root):
        out.setdefault(name, obj)
    return out


# --- the document ---------------------------------------------------------------------------------


def program_to_json(program: StagedProgram, root: nn.Module) -> dict:
    """The document of `program`, whose stages refer to modules of `root` (the traced root,
    CausalLMRoot of the model the program was compiled from); deterministic for one model."""
    paths = _paths(root)
    stages: dict[str, dict] = {}
    experts: list[str] = []
    for call in program.gm.graph.nodes:
        if call.op != "call_module":
            continue
        stage = program.gm.get_submodule(str(call.target))
        assert isinstance(stage, fx.GraphModule), f"stage {call.target}: the staged lint checks this"
        refs: dict[str, str] = {}
        for node in stage.graph.nodes:
            if node.op not in ("call_module", "get_attr"):
                continue
            obj = stage.get_submodule(str(node.target)) if node.op == "call_module" else getattr(stage, str(node.target))
            if isinstance(obj, ExpertShard):  # wrapped again on load, by expert-decompose
                obj = obj.source[0]
                experts.append(str(call.target))
            path = paths.get(id(obj))
            if path is None:
                raise ConfigError(f"stage {call.target}: {node.op} '{node.target}' is not a module or weight of the "
                                  "model (a tensor the trace made?); the program document cannot refer to it")
            refs[str(node.target)] = path
        stages[str(call.target)] = {"nodes": [_node_doc(n) for n in stage.graph.nodes], "refs": refs}
    return {
        "format": FORMAT,
        "version": VERSION,
        "model": program.shape.name,
        "pipeline": list(get_pipeline(PIPELINE)),
        "graph_meta": sorted(short for short, key in (("staged", meta.STAGED), ("kv_inputs", meta.KV_INPUTS))
                             if program.gm.meta.get(key)),
        "experts": sorted(experts),
        "graph": {"nodes": [_node_doc(n) for n in program.gm.graph.nodes]},
        "stages": stages,
    }


def program_from_json(doc: object, model: PreTrainedModel, src: ModelSource, *, where: str = PROGRAM_FILE) -> StagedProgram:
    """The staged program of `doc` over `model`'s own modules and weights (no tracing).

    ConfigError (one line) for anything that is not a podplan program of this model: a wrong
    format, another model, an unknown call target, a reference outside the model.
    """
    if not isinstance(doc, dict) or doc.get("format") != FORMAT or doc.get("version") != VERSION:
        raise ConfigError(f"{where} is not a podplan staged program (format {FORMAT} v{VERSION}); write it again with "
                          "`podplan run PLAN --job-dir`")
    if doc.get("model") != src.name:
        raise ConfigError(f"{where} is the program of {doc.get('model')!r}, the run builds {src.name}; write the job "
                          "again for this model")
    stages_doc, top = doc.get("stages"), doc.get("graph")
    if not isinstance(stages_doc, dict) or not isinstance(top, dict):
        raise ConfigError(f"{where}: 'stages' and 'graph' must be objects; write it again")
    root = CausalLMRoot(model)
    targets = _targets(root)
    methods = frozenset(n for n in dir(torch.Tensor) if not n.startswith("_"))
    stages: dict[str, fx.GraphModule] = {}
    for name, sdoc in stages_doc.items():
        at = f"{where} stage {name!r}"
        _identifier(name, "stage name", where)
        if not isinstance(sdoc, dict) or not isinstance(sdoc.get("refs"), dict):
            raise ConfigError(f"{at}: needs 'nodes' and 'refs'; write it again")
        bound: dict[str, object] = {}
        for attr, path in sdoc["refs"].items():
            _identifier(attr, "attribute", at)
            if not isinstance(path, str) or path not in targets:
                raise ConfigError(f"{at}: {attr} refers to {path!r}, which is not a module, parameter or buffer of "
                                  f"{src.name}; write it again for this model")
            bound[attr] = targets[path]
        graph = _graph(sdoc.get("nodes"), at, methods=methods)
        unbound = [str(n.target) for n in graph.nodes if n.op in ("call_module", "get_attr") and n.target not in bound]
        if unbound:
            raise ConfigError(f"{at}: {unbound[0]} is called but not bound to a module of the model; write it again")
        stages[name] = fx.GraphModule(bound, graph, class_name="GraphModule")
    graph = _graph(top.get("nodes"), f"{where} top level", methods=methods)
    for node in graph.nodes:
        if node.op != "call_module" and not (node.op in ("placeholder", "output") or node.target is operator.getitem):
            raise ConfigError(f"{where}: top-level node {node.name} ({node.op}) is not a stage call; write it again")
        if node.op == "call_module" and node.target not in stages:
            raise ConfigError(f"{where}: top-level node {node.name} calls unknown stage {node.target!r}; write it again")
    gm = fx.GraphModule(dict(stages), graph, class_name="GraphModule")
    flags = doc.get("graph_meta", [])
    gm.meta = {key: True for short, key in (("staged", meta.STAGED), ("kv_inputs", meta.KV_INPUTS))
               if isinstance(flags, list) and short in flags}
    ctx = PassContext(shape=shape_of_model(model, src), batch=_BATCH, seq=_SEQ, past=0)
    try:
        verify(gm, where)
        if doc.get("experts"):  # the document names the stages expert-decompose wrapped
            gm = expert_decompose(gm, ctx)
            verify(gm, where)
    except ConfigError:
        raise
    except Exception as exc:  # noqa: BLE001 - LintError / InputError / torch errors: one line naming the file
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"{where} does not describe a runnable staged program: {first}; write it again") from None
    wrapped = sorted(meta.graph_meta(gm, meta.EXPERTS)) if meta.EXPERTS in gm.meta else []
    if wrapped != doc.get("experts"):
        raise ConfigError(f"{where}: routed-experts stages {doc.get('experts')}, the model's are {wrapped}; write it "
                          "again for this model")
    return StagedProgram(gm=gm, shape=ctx.shape, ctx=ctx)


@functools.lru_cache(maxsize=4)
def meta_trace(model_name: str) -> Traced:
    """`model_name` built and traced on the meta device, once per process: the launcher's checks and
    the program document both read it (passes never mutate the graph they are given)."""
    src = load_source(model_name)
    return trace_model(build_model(src, device="meta"), src)


def meta_program(model_name: str) -> StagedProgram:
    """The staged program of `meta_trace(model_name)`, compiled once per process and pipeline (a pass
    registered or replaced later compiles anew)."""
    pipeline = tuple((name, get_pass(name).run) for name in get_pipeline(PIPELINE))
    return _meta_program(model_name, pipeline)


@functools.lru_cache(maxsize=4)
def _meta_program(model_name: str, pipeline: tuple) -> StagedProgram:
    return staged_program(meta_trace(model_name))


def program_document(model_name: str) -> dict:
    """Compile `model_name` on the meta device (no weights) and give its program document."""
    return program_to_json(meta_program(model_name), meta_trace(model_name).gm)


def write_program(doc: dict, path: str | Path) -> Path:
    """Write the document atomically, keys sorted (the same program gives the same bytes)."""
    out = Path(path)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(json.dumps(doc, sort_keys=True, indent=1) + "\n")
    os.replace(tmp, out)
    return out


def read_program(path: str | Path) -> dict:
    """The document at `path` (plain JSON); ConfigError naming the file if it is missing or not JSON."""
    p = Path(path)
    try:
        doc = json.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{p} is missing; write the job again with `podplan run PLAN --job-dir`") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{p} is not JSON ({type(exc).__name__}: {exc}); write it again with `podplan run PLAN "
                          "--job-dir`") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p} is not a podplan staged program; write it again")
    return doc

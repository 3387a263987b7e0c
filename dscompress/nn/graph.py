"""One analysis of a model's structure, made once and handed to every transform that needs it.

:class:`ModelGraph` traces the model with ``torch.fx`` (depthwise-separable layers kept as single
calls), propagates the shapes of a batch of one through the trace (ShapeProp), and from that
knows each conv module's calls (shapes, how often it runs per forward, what consumes its
output), the functional convs, and which modules run in which order. Torch-Pruning's dependency
graph (which layers' channels are coupled) is built from it on first use. Convert, the units of
a plan, calibration and planning take one ``graph=`` instead of each tracing the model again.

A model fx cannot trace is run once with forward hooks instead: conv shapes, calls and module
order are then known, followers and functional convs are not (``how == "hooks"``).
"""

from __future__ import annotations

import copy
import os
import traceback
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
import torch_pruning as tp
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from dscompress.core.errors import DscompressError, does_not_run, first_line
from dscompress.core.util import captured_output, model_device
from dscompress.nn.layers import LayerTracer


class UntraceableError(DscompressError):
    """torch.fx cannot trace the model (raised only when fx was required)."""


@dataclass
class ConvCall:
    """What the forward pass showed about one conv module: shapes (with the batch of 1), how
    often it runs per forward, and what consumes its output."""

    input_shape: tuple[int, ...]
    output_shape: tuple[int, ...]
    calls: int = 1
    followed_by: list[str] = field(default_factory=list)

    @property
    def out_pixels(self) -> int:
        """Output pixels per image, over all calls."""
        return self.output_shape[2] * self.output_shape[3] * self.calls


class ModelGraph:
    """The structure of ``model`` on inputs of ``input_size`` (C, H, W), found once.

    Attributes:
        how: ``"fx"`` (traced) or ``"hooks"`` (fx could not trace it, or ``trace="hooks"``).
        fx_failure: one line saying why fx could not trace the model (None when it could, or was not tried).
        graph_module: the fx trace, its nodes carrying ShapeProp's ``tensor_meta`` (None with hooks).
        convs: ``{name: ConvCall}`` of every ``nn.Conv2d`` module forward calls, in the order it first calls them.
        functional: names of the fx nodes that call ``F.conv2d`` directly (no module to swap).
        calls: ``{name: calls per forward}`` of the modules forward calls, in the order it first
            calls them: the modules fx keeps as leaves (with hooks: every module but the root).

    Args:
        trace: ``"auto"`` (fx, falling back to hooks), ``"fx"`` (raise :class:`UntraceableError`
            if fx cannot trace) or ``"hooks"``.
    """

    def __init__(self, model: nn.Module, input_size, trace: str = "auto"):
        self.model = model
        self.input_size = tuple(int(v) for v in input_size)
        self.fx_failure: str | None = None
        self.graph_module: torch.fx.GraphModule | None = None
        self.convs: dict[str, ConvCall] = {}
        self.functional: list[str] = []
        self.calls: dict[str, int] = {}
        self._pixels: dict[str, int] = {}  # output pixels of each conv, over all its calls
        self._dependency: tuple[nn.Module, tp.DependencyGraph] | None = None
        modes = {module: module.training for module in model.modules()}
        model.eval()  # the structure forward has at inference; each module's mode is given back after
        try:
            if trace != "hooks":
                try:
                    self.graph_module = torch.fx.GraphModule(model, LayerTracer().trace(model))
                except Exception as e:  # noqa: BLE001 - fx raises many kinds of errors
                    self.fx_failure = _trace_failure(model, e)
                    if trace == "fx":
                        raise UntraceableError(self.fx_failure) from None
            if self.graph_module is not None:
                self._read_fx()
            else:
                self._read_hooks()
        finally:
            for module, training in modes.items():
                module.training = training

    @property
    def how(self) -> str:
        return "fx" if self.graph_module is not None else "hooks"

    def _read_fx(self) -> None:
        try:
            with torch.no_grad(), captured_output():  # ShapeProp prints a traceback before it raises
                ShapeProp(self.graph_module).propagate(_probe(self.model, self.input_size))
        except Exception as e:  # noqa: BLE001
            raise does_not_run(self.input_size, e) from None
        for node in self.graph_module.graph.nodes:
            if node.op == "call_module":
                self.calls[node.target] = self.calls.get(node.target, 0) + 1
            if node.op == "call_module" and type(self.graph_module.get_submodule(node.target)) is nn.Conv2d:
                shape = node.meta["tensor_meta"].shape
                self._pixels[node.target] = self._pixels.get(node.target, 0) + shape[-2] * shape[-1]
                if node.target in self.convs:
                    self.convs[node.target].calls += 1
                    continue
                self.convs[node.target] = ConvCall(
                    input_shape=tuple(node.args[0].meta["tensor_meta"].shape),
                    output_shape=tuple(shape),
                    followed_by=[str(user.target) if user.op == "call_module" else user.name for user in node.users],
                )
            elif node.op == "call_function" and node.target in (F.conv2d, torch.conv2d):
                self.functional.append(node.name)

    def _read_hooks(self) -> None:
        def called(name):
            def count(module, args):
                self.calls[name] = self.calls.get(name, 0) + 1

            return count

        def conv(name):
            def record(module, inputs, output):
                self._pixels[name] = self._pixels.get(name, 0) + output.shape[-2] * output.shape[-1]
                if name in self.convs:
                    self.convs[name].calls += 1
                else:
                    self.convs[name] = ConvCall(tuple(inputs[0].shape), tuple(output.shape))

            return record

        modules = [(n, m) for n, m in self.model.named_modules() if n]
        handles = [m.register_forward_pre_hook(called(n)) for n, m in modules]
        handles += [m.register_forward_hook(conv(n)) for n, m in modules if type(m) is nn.Conv2d]
        try:
            with torch.no_grad():
                self.model(_probe(self.model, self.input_size))
        except Exception as e:  # noqa: BLE001
            raise does_not_run(self.input_size, e) from None
        finally:
            for h in handles:
                h.remove()

    def forward_order(self, names) -> dict[str, int]:
        """``{name: calls per forward}`` for those of ``names`` that forward calls, in the order it first calls them."""
        wanted = set(names)
        return {name: calls for name, calls in self.calls.items() if name in wanted}

    def out_pixels(self, name: str) -> int:
        """Output pixels per image of the conv ``name``, summed over its calls (which may differ
        in size, unlike :attr:`ConvCall.out_pixels`, which counts every call as the first)."""
        return self._pixels[name]

    def dependency_graph(self) -> tuple[nn.Module, tp.DependencyGraph]:
        """Torch-Pruning's dependency graph, built on first use on a deep copy of the model (it
        follows autograd, so every weight of the copy requires grad), and that copy; its modules
        have the model's names."""
        if self._dependency is None:
            model = copy.deepcopy(self.model)
            for p in model.parameters():
                p.requires_grad_(True)
            with torch.enable_grad():
                graph = tp.DependencyGraph().build_dependency(
                    model, example_inputs=torch.zeros(1, *self.input_size, device=next(model.parameters()).device))
            self._dependency = (model, graph)
        return self._dependency


def _probe(model: nn.Module, input_size) -> torch.Tensor:
    """A zero image batch of one, on the model's own device and dtype."""
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None and parameter.is_floating_point() else torch.float32
    return torch.zeros(1, *input_size, device=model_device(model), dtype=dtype)


def _trace_failure(model: nn.Module, error: Exception) -> str:
    """One line naming what torch.fx could not trace, and where in the user's code."""
    where = ""
    torch_dir = os.path.dirname(torch.__file__)
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not frame.filename.startswith(torch_dir):
            where = f" at {os.path.basename(frame.filename)}:{frame.lineno} `{(frame.line or '').strip()}`"
            break
    return f"cannot trace {type(model).__name__} with torch.fx: {first_line(error)}{where}"


class Stages:
    """A traced model run in stages: up to a node, then on from there, as many times as wanted.

    The plan measures hundreds of candidate forms of one unit against the same images: the part of
    the model before the unit is the original's for all of them, so it runs once, and each
    candidate runs only from the unit on. An *environment* is the values alive at one point of
    the forward pass for one batch (the node outputs that later nodes still use); the modules are
    looked up in ``graph_module`` as each node runs, so swapping one there (``set_submodule``)
    changes what runs after a cut but not the environments already computed.

    Args:
        graph_module: an fx trace (:attr:`ModelGraph.graph_module`, or one traced from a copy).
    """

    def __init__(self, graph_module: torch.fx.GraphModule):
        self.graph_module = graph_module
        self.nodes = list(graph_module.graph.nodes)
        self.index = {node: i for i, node in enumerate(self.nodes)}
        self.last_use = {node: max((self.index[u] for u in node.users), default=self.index[node]) for node in self.nodes}
        self.interpreter = torch.fx.Interpreter(graph_module)

    def position(self, target: str) -> int:
        """The index of the node that first calls the module ``target``."""
        return next(i for i, node in enumerate(self.nodes) if node.op == "call_module" and node.target == target)

    def start(self, x: torch.Tensor) -> dict:
        """The environment before the first node, for a batch ``x`` (the model's one input)."""
        placeholders = [n for n in self.nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise DscompressError(f"staged runs take a model with one input; this one takes {len(placeholders)}")
        return {"at": 0, "values": {}, "input": x}

    @torch.no_grad()
    def run(self, env: dict, stop: int | None = None, keep: bool = False) -> dict:
        """Run ``env``'s batch from where it is to node ``stop`` (exclusive; the end when None).

        Returns the environment at ``stop``: a new one (``env`` is left as it was) when ``keep``,
        else ``env`` itself, advanced, with the values nothing after ``stop`` uses dropped.
        """
        stop = len(self.nodes) if stop is None else stop
        # a copy's tensors are copied too: a node after the cut may write into its input (ReLU(inplace=True), +=)
        values = {n: v.clone() if isinstance(v, torch.Tensor) else v for n, v in env["values"].items()} if keep else env["values"]
        interpreter = self.interpreter
        interpreter.env = values
        for i in range(env["at"], stop):
            node = self.nodes[i]
            if node.op == "placeholder":
                values[node] = env["input"]
            elif node.op == "output":
                values[node] = interpreter.fetch_args_kwargs_from_env(node)[0][0]
            else:
                values[node] = interpreter.run_node(node)
        if not keep:
            for node in [n for n in values if self.last_use[n] < stop and n.op != "output"]:
                del values[node]
        return {"at": stop, "values": values, "input": env["input"]}

    def value(self, env: dict, node: torch.fx.Node):
        return env["values"][node]

    def output(self, env: dict):
        """The model's output in an environment run to the end."""
        return env["values"][self.nodes[-1]]

"""Passes over exported ONNX graphs: nodes ONNX Runtime refuses, and metadata.

* Conv nodes that combine ``auto_pad=SAME_*`` with dilation > 1 (the TorchScript exporter writes
  them for ``padding="same"`` dilated convolutions) are refused by ONNX Runtime's CPU Conv:
  :func:`same_pad_dilation_nodes` finds them and :func:`explicit_same_pads` rewrites the stride-1
  ones to explicit pads.
* :func:`stamp` writes ``metadata_props``.
"""

from __future__ import annotations

import onnx


def _attributes(node) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _same_pad_dilated(node) -> bool:
    if node.op_type != "Conv" or node.domain not in ("", "ai.onnx"):
        return False
    attrs = _attributes(node)
    auto_pad = attrs.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    return auto_pad.startswith("SAME") and any(d > 1 for d in attrs.get("dilations", []))


def same_pad_dilation_nodes(graph) -> list[str]:
    """Names of Conv nodes that combine ``auto_pad=SAME_UPPER/LOWER`` with a dilation > 1.

    ONNX allows them; ONNX Runtime's CPU Conv refuses them at run time ("Dilation not supported
    for AutoPadType::SAME_UPPER or AutoPadType::SAME_LOWER"). Subgraphs (If/Loop bodies) are
    searched too.
    """
    flagged = []
    for node in graph.node:
        if _same_pad_dilated(node):
            flagged.append(node.name or f"Conv({', '.join(node.input)})")
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                flagged += same_pad_dilation_nodes(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for g in attr.graphs:
                    flagged += same_pad_dilation_nodes(g)
    return flagged


def explicit_same_pads(graph) -> list[str]:
    """Rewrite stride-1 ``auto_pad=SAME_*`` Convs with dilation > 1 to explicit ``pads``.

    With stride 1 the "same" padding does not depend on the input size: each spatial side gets
    ``dilation * (kernel - 1)`` in total, the odd one extra at the end (SAME_UPPER) or the
    beginning (SAME_LOWER). Only the top-level graph is rewritten. Returns the names of the
    rewritten nodes; strided ones are left (and stay flagged by :func:`same_pad_dilation_nodes`).
    """
    weights = {t.name: list(t.dims) for t in graph.initializer}
    fixed = []
    for node in graph.node:
        if not _same_pad_dilated(node):
            continue
        attrs = _attributes(node)
        kernel = list(attrs.get("kernel_shape") or weights.get(node.input[1], [])[2:])
        strides = attrs.get("strides", [1] * len(kernel))
        if not kernel or any(s != 1 for s in strides):
            continue
        dilations = attrs["dilations"]
        upper = attrs["auto_pad"] in (b"SAME_UPPER", "SAME_UPPER")
        totals = [d * (k - 1) for d, k in zip(dilations, kernel)]
        begins = [t // 2 if upper else t - t // 2 for t in totals]
        ends = [t - b for t, b in zip(totals, begins)]
        kept = [a for a in node.attribute if a.name not in ("auto_pad", "pads")]
        del node.attribute[:]
        node.attribute.extend(kept)
        node.attribute.append(onnx.helper.make_attribute("pads", begins + ends))
        fixed.append(node.name)
    return fixed


def stamp(proto, metadata: dict) -> None:
    existing = {p.key: p.value for p in proto.metadata_props}
    existing.update({k: str(v) for k, v in metadata.items()})
    onnx.helper.set_model_props(proto, existing)

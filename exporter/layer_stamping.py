"""A deep model's ONNX graph from three exported layers: the last of them stamped out for the rest.

torch.export traces each decoder layer anew with symbolic shapes: about 1.3 s per layer on 2 cores (a
SmolLM-135M-shaped Llama: 42 s of a 70 s convert for 30 layers), though layers 1..N-1 come out as the same
nodes but for their weights and cache inputs and outputs. So when a model's layers repeat one block, the
ONNX capture exports three layers, checks that layers 1 and 2 came out node for node alike (an op, a
constant or a mask that depends on the layer index shows up there), and clones layer 2's nodes for layers
3..N-1, each wired to its own weights, cache IO and the previous layer's output. Verification against the
PyTorch model then checks the whole graph, as for any capture.

A layer's nodes are those whose `pkg.torch.onnx.name_scopes` (the module path the exporter records on each
node) holds `{scope}.{index}`. A value a layer takes from outside is one of:
- a weight: an initializer named `{scope}.{index}.<rest>`; stamped layers get `{scope}.{k}.<rest>`;
- a constant: a Constant node's output or another initializer, compared by content;
- a cache IO: a graph input (or output) whose dotted name holds the index, `past_key_values.2.key`;
  other graph inputs are shared;
- a carry: a value of the previous layer's nodes that depends on its weights (the residual stream);
- any other value, shared by every layer (the mask, the rotary tables, sizes), compared by identity.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import onnx_ir as ir

NAME_SCOPES = "pkg.torch.onnx.name_scopes"
TEMPLATE = 2  # the layer stamped out: its predecessor (layer 1) is a repeated layer too, unlike layer 0's
EXPORTED = TEMPLATE + 1


class NotRepeated(Exception):
    """The exported layers are not one block repeated: capture the whole model instead."""


@dataclass
class _Block:
    nodes: list[ir.Node]
    position: dict[ir.Node, int]  # node -> its index in `nodes`
    # The values that depend on the layer's weights or cache inputs: what the next layer may carry over.
    # Others the exporter files under a layer are shared (`batch * sequence` computed once, in layer 0).
    variant: set[ir.Value]


def stamp_layers(model: ir.Model, scope: str, count: int, weights: Mapping[str, "torch.Tensor"],
                 io_order: tuple[list[str], list[str]]) -> int:
    """Grow `model`, exported with layers 0..2 of `scope`, to `count` layers in place; return the number stamped.

    `weights` maps initializer names (`{scope}.{k}.<rest>`) to the full model's tensors; `io_order` is the full
    graph's (input names, output names). Raises NotRepeated, leaving `model` unchanged, when layers 1 and 2
    differ or a layer's values are used in a way stamping cannot reproduce.
    """
    graph = model.graph
    blocks = [_layer_block(graph, scope, i, weights) for i in range(EXPORTED)]
    previous, template = blocks[TEMPLATE - 1], blocks[TEMPLATE]
    if _describe(scope, TEMPLATE - 1, blocks[TEMPLATE - 2], previous, weights) != \
            _describe(scope, TEMPLATE, previous, template, weights):
        raise NotRepeated(f"layers {TEMPLATE - 1} and {TEMPLATE} export to different nodes")
    tail_uses = _tail_uses(graph, blocks)
    new_inputs, new_outputs, new_weights = {}, {}, {}
    plans = [_layer_values(scope, template, k, weights, new_inputs, new_weights) for k in range(EXPORTED, count)]
    # Nothing of `model` has changed up to here: every refusal above leaves it as exported.
    last = template
    for k, substitutes in zip(range(EXPORTED, count), plans):
        last = _clone_block(graph, template, previous, last, k, scope, substitutes, new_outputs)
    for (node, index), (position, output) in tail_uses.items():
        node.replace_input_with(index, last.nodes[position].outputs[output])
    for value in new_weights.values():
        graph.register_initializer(value)
    _reorder_io(graph, new_inputs, new_outputs, io_order)
    return count - EXPORTED


def _layer_block(graph: ir.Graph, scope: str, index: int, weights: Mapping) -> _Block:
    marker = repr(f"{scope}.{index}")  # name_scopes is a list's repr: the quotes make `layers.1` miss `layers.10`
    scoped = {node for node in graph if marker in node.metadata_props.get(NAME_SCOPES, "")}
    if not scoped:
        raise NotRepeated(f"no node of the graph belongs to {scope}.{index}")
    # The exporter files some of a layer's nodes at the top, where the cache is built:
    # `Identity(past_key_values.2.key)`. Nodes fed by the layer's cache inputs alone and read by the layer
    # alone are the layer's too (not `Shape(past_key_values.2.value)`, the past length every layer reads).
    fed: set[ir.Node] = set()
    for node in graph:
        if node not in scoped and node.inputs and all(
                value is not None and (value.producer() in fed if value.producer() is not None
                                       else value.is_graph_input() and layer_io_name(value.name, index, "#"))
                for value in node.inputs):
            fed.add(node)
    satellites: set[ir.Node] = set()
    for node in reversed([node for node in graph if node in fed]):
        if all(use.node in scoped or use.node in satellites for value in node.outputs for use in value.uses()):
            satellites.add(node)
    nodes = [node for node in graph if node in scoped or node in satellites]
    return _Block(nodes, {node: i for i, node in enumerate(nodes)}, _variant(graph, scope, index, weights))


def _variant(graph: ir.Graph, scope: str, index: int, weights: Mapping) -> set[ir.Value]:
    """Every value that depends on layer `index`'s weights or cache inputs."""
    sources = {v for v in graph.inputs if layer_io_name(v.name, index, "#")}
    sources |= {v for v in graph.initializers.values() if _weight_suffix(v, scope, index, weights) is not None}
    found = set(sources)
    for node in graph:
        if any(value in found for value in node.inputs):
            found.update(node.outputs)
    return found


def layer_io_name(name: str, layer: int, to: int | str) -> str | None:
    """`past_key_values.2.key` -> `past_key_values.{to}.key` for layer 2; None when the name holds no such index."""
    parts = name.split(".")
    hits = [i for i, part in enumerate(parts) if part == str(layer)]
    if len(hits) != 1:
        return None
    parts[hits[0]] = str(to)
    return ".".join(parts)


def _weight_suffix(value: ir.Value, scope: str, layer: int, weights: Mapping) -> str | None:
    """`<rest>` of a layer's weight `{scope}.{layer}.<rest>`; None for other values, the constants the
    exporter lifts into initializers (`...self_attention.lifted_tensor_8`) included."""
    prefix = f"{scope}.{layer}."
    is_weight = value.is_initializer() and value.name.startswith(prefix) and value.name in weights
    return value.name[len(prefix):] if is_weight else None


def _constant_key(node: ir.Node) -> tuple:
    return tuple(_attribute_key(attr) for attr in node.attributes.values())


def _attribute_key(attr: ir.Attr) -> tuple:
    if attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
        raise NotRepeated("a layer holds a subgraph")
    value = attr.value
    if isinstance(value, ir.TensorProtocol):
        return attr.name, str(value.dtype), tuple(value.shape), value.numpy().tobytes()
    return attr.name, repr(value)


def _input_key(value: ir.Value | None, scope: str, layer: int, previous: _Block, block: _Block,
               carries: list[ir.Value], weights: Mapping) -> tuple:
    """What `value`, an input of one of `layer`'s nodes, is to the layer, in terms alike for alike layers."""
    if value is None:
        return ("none",)
    producer = value.producer()
    if producer in block.position:
        return "local", block.position[producer], value.index()
    if producer is not None and producer.op_type == "Constant" and not producer.inputs:
        return ("constant", *_constant_key(producer))
    if producer in previous.position and value in previous.variant:
        if value not in carries:
            carries.append(value)
        return "carry", carries.index(value)
    suffix = _weight_suffix(value, scope, layer, weights)
    if suffix is not None:
        return "weight", suffix, str(value.dtype), tuple(value.shape)
    if value.is_initializer() and value.const_value is not None:
        tensor = value.const_value
        return "constant", str(tensor.dtype), tuple(tensor.shape), tensor.numpy().tobytes()
    name = layer_io_name(value.name, layer, "#") if value.is_graph_input() else None
    return ("input", name) if name else ("shared", id(value))


def _describe(scope: str, layer: int, previous: _Block, block: _Block, weights: Mapping) -> list[tuple]:
    """`layer`'s nodes as op, attributes and input roles; equal for two layers that stamp alike."""
    carries: list[ir.Value] = []
    described = []
    for node in block.nodes:
        inputs = tuple(_input_key(value, scope, layer, previous, block, carries, weights) for value in node.inputs)
        outputs = tuple(layer_io_name(v.name, layer, "#") if v.is_graph_output() else None for v in node.outputs)
        described.append((node.domain, node.op_type, node.overload, _constant_key(node), inputs, outputs))
    return described


def _tail_uses(graph: ir.Graph, blocks: list[_Block]) -> dict[tuple[ir.Node, int], tuple[int, int]]:
    """Uses of the last exported layer's values by nodes after the layers (the final norm): (node, input index)
    -> (position in the layer, output index). Refuses other uses of the layers' values outside them (before
    the template's end, or of earlier layers after the layers), which a stamped graph would have to move."""
    order = {node: i for i, node in enumerate(graph)}
    in_layers = {node for block in blocks for node in block.nodes}
    template, previous = blocks[TEMPLATE], blocks[TEMPLATE - 1]
    end = order[template.nodes[-1]]
    uses = {}
    for node in template.nodes:
        for value in node.outputs:
            if value.is_graph_output() and layer_io_name(value.name, TEMPLATE, "#") is None:
                raise NotRepeated(f"layer {TEMPLATE}'s value {value.name!r} is a graph output")
            for use in value.uses():
                if use.node not in in_layers:
                    if order[use.node] < end:
                        raise NotRepeated(f"layer {TEMPLATE}'s value {value.name!r} is used before the layer ends")
                    uses[(use.node, use.idx)] = (template.position[node], value.index())
    for node in previous.nodes:
        for value in node.outputs:
            if any(use.node not in in_layers for use in value.uses()):
                raise NotRepeated(f"layer {TEMPLATE - 1}'s value {value.name!r} is used outside the layers")
    return uses


def _layer_values(scope: str, template: _Block, k: int, weights: Mapping, new_inputs: dict,
                  new_weights: dict) -> dict[ir.Value, ir.Value]:
    """Layer k's weights and cache inputs, made beside the template's: template value -> layer k's value."""
    substitutes = {}
    for node in template.nodes:
        for value in node.inputs:
            if value is None or value in substitutes:
                continue
            suffix = _weight_suffix(value, scope, TEMPLATE, weights)
            if suffix is not None:
                name = f"{scope}.{k}.{suffix}"
                if name not in weights or tuple(weights[name].shape) != tuple(value.shape):
                    raise NotRepeated(f"layer {k} has no weight {name!r} shaped like {value.name!r}")
                substitutes[value] = new_weights[name] = _initializer(name, value, weights[name])
            elif value.is_graph_input() and (name := layer_io_name(value.name, TEMPLATE, k)):
                substitutes[value] = new_inputs[name] = ir.Value(name=name, type=value.type, shape=value.shape)
    return substitutes


def _initializer(name: str, like: ir.Value, tensor) -> ir.Value:
    from onnx_ir.tensor_adapters import TorchTensor

    # TorchTensor wraps the parameter's memory: no copy until the graph is written.
    return ir.Value(name=name, type=like.type, shape=like.shape,
                    const_value=TorchTensor(tensor.detach().contiguous(), name=name))


def _clone_block(graph: ir.Graph, template: _Block, previous: _Block, last: _Block, k: int, scope: str,
                 substitutes: dict[ir.Value, ir.Value], new_outputs: dict) -> _Block:
    """Layer k: the template's nodes cloned after `last` (layer k-1), their carries taken from it."""
    mapped = dict(substitutes)
    nodes = []
    for node in template.nodes:
        inputs = []
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if value in mapped:
                inputs.append(mapped[value])
            elif producer in template.position:
                raise AssertionError("template nodes are in graph order")
            elif producer in previous.position and value in previous.variant:
                inputs.append(last.nodes[previous.position[producer]].outputs[value.index()])
            else:
                inputs.append(value)  # shared by every layer
        clone = ir.Node(node.domain, node.op_type, inputs, list(node.attributes.values()), overload=node.overload,
                        num_outputs=len(node.outputs), version=node.version, name=f"{node.name}.layer{k}",
                        metadata_props=_scoped(node.metadata_props, scope, k))
        for value, copied in zip(node.outputs, clone.outputs):
            copied.type, copied.shape = value.type, value.shape
            io_name = layer_io_name(value.name, TEMPLATE, k) if value.is_graph_output() else None
            copied.name = io_name or f"{value.name}.layer{k}"
            if io_name:
                new_outputs[io_name] = copied
            mapped[value] = copied
        nodes.append(clone)
    graph.insert_after(last.nodes[-1], nodes)
    return _Block(nodes, {node: i for i, node in enumerate(nodes)}, variant=set())  # read of layers 0-2 only


def _scoped(metadata: Mapping[str, str], scope: str, k: int) -> dict[str, str]:
    """The template's metadata with its module path moved to layer k (profiles and debuggers read it)."""
    pattern = re.compile(re.escape(f"{scope}.{TEMPLATE}") + r"(?=[.'/:]|$)")
    return {key: pattern.sub(f"{scope}.{k}", text) for key, text in metadata.items()}


def _reorder_io(graph: ir.Graph, new_inputs: dict, new_outputs: dict, io_order: tuple[list[str], list[str]]) -> None:
    inputs = {value.name: value for value in graph.inputs} | new_inputs
    outputs = {value.name: value for value in graph.outputs} | new_outputs
    names_in, names_out = io_order
    if set(inputs) != set(names_in) or set(outputs) != set(names_out):
        raise AssertionError(f"stamped graph IO {sorted(inputs)} -> {sorted(outputs)} is not the contract's")
    graph.inputs.clear()
    graph.inputs.extend(inputs[name] for name in names_in)
    graph.outputs.clear()
    graph.outputs.extend(outputs[name] for name in names_out)


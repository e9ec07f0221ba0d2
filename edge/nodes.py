"""The pieces rewritten graphs are made of: nodes in the right opset form, the frame geometry,
the fused preprocessing.

`GraphBuilder` collects nodes and constants, in the forms of the opset of the model they join:
Unsqueeze's `axes` became an input at opset 13 and ReduceMax's at 18, so a YOLOv8 export at
opset 17 gets opset-17 nodes; this is the one place that knows those forms. `Geometry` says
how a frame maps onto the network input; `preprocess` adds the card's preprocessing (resize
or letterbox, colour order, scale/mean/std, HWC->CHW) as the first nodes of a graph.

Only operators that the TensorRT 8.2 ONNX parser accepts are used (edge/backends/trtcheck.py
holds its list and the tests check every rewritten graph against it): Resize with `sizes`
(constant, or in a batched graph the batch's shape: a shape tensor), Pad with constant pads,
Gather/Slice with constant indices, TopK with a constant K.
Model families (edge/families) build their nodes from these pieces; edge.graph puts a card,
its family and a model together.
"""

import numpy as np

# onnx is imported where nodes are made, not here: a daemon whose engines come from the
# cache never rewrites a graph, and onnx costs ~14 MB of RSS (README, A fleet).

FRAME_INPUT = "frame"
OPSET = 11            # of the graphs built from scratch (preprocessing or post-processing alone)
# Opsets at which an attribute of an operator we emit became an input.
UNSQUEEZE_AXES_INPUT = 13
REDUCE_AXES_INPUT = 18


class Geometry:
    """How a frame of (frame_w, frame_h) maps onto the network input of the card.

    Network pixel (u, v) = (x * sx + pad_x, y * sy + pad_y) for frame pixel (x, y).
    """

    def __init__(self, card, frame_w, frame_h):
        self.reference_size = None
        self.frame_dtype = "uint8"
        self.batched = False        # frames (batch, H, W, 3), several cameras' in one run
        net_w, net_h = card.input_size
        self.frame_w, self.frame_h = int(frame_w), int(frame_h)
        self.net_w, self.net_h = net_w, net_h
        if card.input["resize"] == "stretch":
            self.new_w, self.new_h = net_w, net_h
        else:
            r = min(net_w / self.frame_w, net_h / self.frame_h)
            # int() as in the YOLOX and YOLOv5 reference preprocessing
            self.new_w = max(1, min(net_w, int(self.frame_w * r)))
            self.new_h = max(1, min(net_h, int(self.frame_h * r)))
        self.sx = self.new_w / self.frame_w
        self.sy = self.new_h / self.frame_h
        if card.input["resize"] == "letterbox" and card.input["pad"]["position"] == "center":
            self.pad_x = (net_w - self.new_w) // 2
            self.pad_y = (net_h - self.new_h) // 2
        else:
            self.pad_x = self.pad_y = 0


class GraphBuilder:
    """Collects nodes and constants with unique names under a prefix, in the node forms of
    `opset` (the default-domain opset of the model the nodes join)."""

    def __init__(self, prefix, opset=OPSET, batched=False):
        self.prefix = prefix
        self.opset = opset
        # Tensors carry a dynamic batch dimension first (several cameras' frames): shapes
        # are built from it instead of a constant 1.
        self.batched = batched
        self.nodes = []
        self.initializers = []
        self._count = 0

    def name(self, hint):
        self._count += 1
        return "{}/{}_{}".format(self.prefix, hint, self._count)

    def const(self, value, dtype=np.float32, hint="const"):
        from onnx import numpy_helper
        name = self.name(hint)
        self.initializers.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def op(self, op_type, inputs, hint=None, outputs=1, **attrs):
        from onnx import helper
        names = [self.name(hint or op_type.lower()) for _ in range(outputs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, **attrs))
        return names[0] if outputs == 1 else names

    def unsqueeze(self, x, axes, hint="unsqueeze"):
        """Unsqueeze with `axes` as an attribute (opset < 13) or a constant input (13+)."""
        if self.opset >= UNSQUEEZE_AXES_INPUT:
            return self.op("Unsqueeze", [x, self.const(axes, np.int64, "axes")], hint)
        return self.op("Unsqueeze", [x], hint, axes=list(axes))

    def reduce_max(self, x, axes, keepdims, hint="reduce_max"):
        """ReduceMax with `axes` as an attribute (opset < 18) or a constant input (18+)."""
        if self.opset >= REDUCE_AXES_INPUT:
            return self.op("ReduceMax", [x, self.const(axes, np.int64, "axes")], hint,
                           keepdims=keepdims)
        return self.op("ReduceMax", [x], hint, axes=list(axes), keepdims=keepdims)

    def slice(self, x, start, end, axis):
        return self.op("Slice", [x, self.const([start], np.int64), self.const([end], np.int64),
                                 self.const([axis], np.int64)], "slice")

    def batch_shape(self, x, rest, hint="shape"):
        """The int64 shape [batch of x, *rest] (a shape tensor: TensorRT takes it as the
        Resize layer's output size, IResizeLayer::setInput(1))."""
        batch = self.slice(self.op("Shape", [x], "batch_of"), 0, 1, 0)
        return self.op("Concat", [batch, self.const(rest, np.int64, hint)], hint, axis=0)

    def rename_output(self, tensor, name):
        """Make the node that produces `tensor` write `name` instead."""
        for node in self.nodes:
            for i, out in enumerate(node.output):
                if out == tensor:
                    node.output[i] = name
                    return name
        from onnx import helper
        self.nodes.append(helper.make_node("Identity", [tensor], [name]))
        return name


def preprocess(g, card, geometry, frame, frame_dtype="uint8"):
    """Nodes from the (H, W, 3) BGR frame (batched: (B, H, W, 3) frames) to the network
    input; returns its name.

    The frame is uint8 as captured; `frame_dtype="float32"` is the one exception, for
    TensorRT < 8.5, which has no uint8 inputs (the backend casts on the host).
    """
    from onnx import TensorProto
    inp = card.input
    x = frame
    if frame_dtype == "uint8":
        x = g.op("Cast", [frame], "to_float", to=TensorProto.FLOAT)
    if not geometry.batched:
        x = g.unsqueeze(x, [0], "batch")
    x = g.op("Transpose", [x], "hwc_to_chw", perm=[0, 3, 1, 2])          # (B, 3, H, W)
    if (geometry.new_w, geometry.new_h) != (geometry.frame_w, geometry.frame_h):
        # Resize before the colour step: fewer pixels to convert, and both are linear.
        # Sizes, not scales: a float scale times the size may round to a pixel less.
        if geometry.batched:
            sizes = g.batch_shape(x, [3, geometry.new_h, geometry.new_w], "sizes")
        else:
            sizes = g.const([1, 3, geometry.new_h, geometry.new_w], np.int64, "sizes")
        x = g.op("Resize", [x, g.const([], np.float32, "roi"), g.const([], np.float32, "scales"),
                            sizes], "resize", mode="linear",
                 coordinate_transformation_mode="half_pixel")
    if (geometry.new_w, geometry.new_h) != (geometry.net_w, geometry.net_h):
        left, top = geometry.pad_x, geometry.pad_y
        right = geometry.net_w - geometry.new_w - left
        bottom = geometry.net_h - geometry.new_h - top
        x = g.op("Pad", [x, g.const([0, 0, top, left, 0, 0, bottom, right], np.int64, "pads"),
                         g.const(inp["pad"]["value"], np.float32, "pad_value")], "letterbox",
                 mode="constant")
    channels = 3
    if inp["color"] == "rgb":
        x = g.op("Gather", [x, g.const([2, 1, 0], np.int64, "bgr_to_rgb")], "rgb", axis=1)
    elif inp["color"] == "gray":
        # ITU-R BT.601 luma, as cv2.cvtColor(BGR2GRAY); weights in B, G, R order
        weights = g.const(np.array([0.114, 0.587, 0.299]).reshape(1, 3, 1, 1), hint="luma")
        x = g.op("Conv", [x, weights], "gray")
        channels = 1
    mean = np.asarray(inp["mean"][:channels], np.float64)
    std = np.asarray(inp["std"][:channels], np.float64)
    mul = float(inp["scale"]) / std
    add = -mean / std
    if not np.allclose(mul, 1.0):
        x = g.op("Mul", [x, g.const(mul.reshape(1, channels, 1, 1), hint="scale")], "scale")
    if not np.allclose(add, 0.0):
        x = g.op("Add", [x, g.const(add.reshape(1, channels, 1, 1), hint="mean")], "mean")
    return x


def model_opset(model):
    """The model's default-domain ("" or "ai.onnx") opset version."""
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return entry.version
    raise ValueError("the model imports no default ONNX opset")


def frame_input(geometry, width=None, height=None, name=FRAME_INPUT):
    """The value info of an (H, W, 3) image input of the geometry's frame dtype
    ((batch, H, W, 3) for a batched geometry)."""
    return frame_info(width or geometry.frame_w, height or geometry.frame_h, name,
                      geometry.frame_dtype, geometry.batched)


BATCH = "batch"       # the name of the dynamic batch dimension of batched graphs


def frame_info(frame_w, frame_h, name=FRAME_INPUT, dtype="uint8", batched=False):
    from onnx import TensorProto, helper
    dtypes = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT}
    shape = [frame_h, frame_w, 3]
    return helper.make_tensor_value_info(name, dtypes[dtype],
                                         [BATCH] + shape if batched else shape)

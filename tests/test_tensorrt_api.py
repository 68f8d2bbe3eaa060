"""The TensorRT 11 reduced-precision pass (casts around every matrix multiply) on a stand-in network.

TensorRT is not installed on any machine of this project: the stand-in below follows the documented
INetworkDefinition / ILayer / ITensor Python API closely enough to check the rewiring itself.
"""
from __future__ import annotations

import types

from stvfm_engine.engine.backends.tensorrt import cast_matmuls

DataType = types.SimpleNamespace(FLOAT="float32", HALF="float16", BF16="bfloat16", INT64="int64")
LayerType = types.SimpleNamespace(MATRIX_MULTIPLY="matmul", NORMALIZATION="norm", ELEMENTWISE="add", CAST="cast",
                                  CONSTANT="const", SOFTMAX="softmax")
TRT = types.SimpleNamespace(DataType=DataType, LayerType=LayerType)


class Tensor:
    def __init__(self, name, dtype):
        self.name, self.dtype, self.is_network_output = name, dtype, False


class Layer:
    def __init__(self, network, kind, inputs, dtype=None):
        self.network, self.type, self.inputs = network, kind, list(inputs)
        self.out = Tensor(f"{kind}{len(network.layers)}", dtype)
        self.retype()

    def retype(self):  # strongly typed: an output's type follows the inputs (a cast's follows its target)
        if self.type in (LayerType.MATRIX_MULTIPLY, LayerType.ELEMENTWISE, LayerType.NORMALIZATION, LayerType.SOFTMAX):
            types_in = {t.dtype for t in self.inputs}
            self.out.dtype = types_in.pop() if len(types_in) == 1 else "mixed"  # the builder would refuse it

    num_inputs = property(lambda self: len(self.inputs))
    num_outputs = 1

    def get_input(self, j):
        return self.inputs[j]

    def set_input(self, j, tensor):
        self.inputs[j] = tensor
        self.network.retype_all()

    def get_output(self, j):
        return self.out


class Network:
    def __init__(self):
        self.layers, self.outputs = [], []

    def add(self, kind, *inputs, dtype=None):
        self.layers.append(Layer(self, kind, inputs, dtype))
        return self.layers[-1].out

    def add_cast(self, tensor, dtype):
        self.layers.append(Layer(self, LayerType.CAST, [tensor], dtype))
        return self.layers[-1]

    def retype_all(self):
        for layer in self.layers:
            layer.retype()

    num_layers = property(lambda self: len(self.layers))

    def get_layer(self, i):
        return self.layers[i]

    def mark_output(self, t):
        t.is_network_output = True
        self.outputs.append(t)

    def unmark_output(self, t):
        t.is_network_output = False
        self.outputs.remove(t)


def test_every_matmul_runs_in_the_reduced_type_and_the_rest_in_fp32():
    net = Network()
    x = Tensor("x", DataType.FLOAT)
    w1, w2 = net.add(LayerType.CONSTANT, dtype=DataType.FLOAT), net.add(LayerType.CONSTANT, dtype=DataType.FLOAT)
    h = net.add(LayerType.NORMALIZATION, x)
    a = net.add(LayerType.MATRIX_MULTIPLY, h, w1)  # feeds a softmax and, directly, a second matmul
    s = net.add(LayerType.SOFTMAX, a)
    b = net.add(LayerType.MATRIX_MULTIPLY, a, w2)
    y = net.add(LayerType.ELEMENTWISE, b, s)
    y.name = "y"
    net.mark_output(y)
    c = net.add(LayerType.MATRIX_MULTIPLY, y, w1)  # a matmul whose product is itself a network output
    c.name = "c"
    net.mark_output(c)

    assert cast_matmuls(TRT, net, DataType.BF16) == 3
    assert all(layer.out.dtype != "mixed" for layer in net.layers)
    matmuls = [layer for layer in net.layers if layer.type == LayerType.MATRIX_MULTIPLY]
    assert all(t.dtype == DataType.BF16 for m in matmuls for t in m.inputs)
    assert all(m.out.dtype == DataType.BF16 for m in matmuls)
    for layer in net.layers:  # everything else reads fp32: casts back sit between
        if layer.type not in (LayerType.MATRIX_MULTIPLY, LayerType.CAST):
            assert all(t.dtype == DataType.FLOAT for t in layer.inputs), layer.type
    assert [t.name for t in net.outputs] == ["y", "c"] and all(t.dtype == DataType.FLOAT for t in net.outputs)
    assert sum(layer.type == LayerType.CAST and layer.inputs[0] is w1 for layer in net.layers) == 1  # shared cast


def test_nothing_to_cast_in_a_network_without_fp32_matmuls():
    net = Network()
    idx = Tensor("tod", DataType.INT64)
    net.add(LayerType.MATRIX_MULTIPLY, idx, idx)
    net.add(LayerType.NORMALIZATION, Tensor("x", DataType.FLOAT))
    assert cast_matmuls(TRT, net, DataType.HALF) == 0

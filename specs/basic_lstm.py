"""TensorFlow 1.x BasicLSTMCell (state_is_tuple): gates i, j, f, o; forget_bias added to f."""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("basic_lstm", doc=__doc__)
x = cell.input()
c = cell.state("c")
h = cell.state("h")
forget_bias = cell.hyper("forget_bias", 1.0)
i, j, f, o = cell.linear([x, h], gates=("i", "j", "f", "o"), kernel="kernel", bias="bias")
new_c = c * sigmoid(f + forget_bias) + sigmoid(i) * tanh(j)
new_h = tanh(new_c) * sigmoid(o)
cell.update(c, new_c)
cell.update(h, new_h)
cell.output(new_h)

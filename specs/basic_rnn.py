"""TensorFlow 1.x BasicRNNCell: h' = tanh([x, h] @ kernel + bias)."""

from cellgen.dsl import Cell, tanh

cell = Cell("basic_rnn", doc=__doc__)
x = cell.input()
h = cell.state("h")
pre = cell.linear([x, h], gates=("pre",), kernel="kernel", bias="bias")
new_h = tanh(pre)
cell.update(h, new_h)
cell.output(new_h)

"""QRNN (Bradbury et al. 2016) with f-pooling and a window of 1.

z, f = x_t @ kernel + bias;  h' = sigmoid(f) * h + (1 - sigmoid(f)) * tanh(z)
"""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("qrnn_f", doc=__doc__)
x = cell.input()
h = cell.state("h")
z_pre, f_pre = cell.linear([x], gates=("z", "f"), kernel="kernel", bias="bias")
f = sigmoid(f_pre)
new_h = f * h + (1 - f) * tanh(z_pre)
cell.update(h, new_h)
cell.output(new_h)

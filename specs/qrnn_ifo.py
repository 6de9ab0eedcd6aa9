"""QRNN (Bradbury et al. 2016) with ifo-pooling and a window of 1.

z, f, o, i = x_t @ kernel + bias;  c' = sigmoid(f) * c + sigmoid(i) * tanh(z);  h = sigmoid(o) * c'
"""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("qrnn_ifo", doc=__doc__)
x = cell.input()
c = cell.state("c")
z_pre, f_pre, o_pre, i_pre = cell.linear([x], gates=("z", "f", "o", "i"), kernel="kernel", bias="bias")
new_c = sigmoid(f_pre) * c + sigmoid(i_pre) * tanh(z_pre)
cell.update(c, new_c)
cell.output(sigmoid(o_pre) * new_c)

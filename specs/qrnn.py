"""QRNN (Bradbury et al. 2016) with fo-pooling and a convolution window of 2.

The window is a state ``x_prev`` (x_{t-1}) updated to the input: the compiler sees it
depends on inputs only and hoists its part of the projection out of the time loop.

z, f, o = [x_t, x_{t-1}] @ kernel + bias      (kernel rows: x_t first, then x_{t-1})
c' = sigmoid(f) * c + (1 - sigmoid(f)) * tanh(z);  h = sigmoid(o) * c'
"""

from cellgen.dsl import INPUT_SIZE, Cell, sigmoid, tanh

cell = Cell("qrnn", doc=__doc__)
x = cell.input()
c = cell.state("c")
x_prev = cell.state("x_prev", size=INPUT_SIZE)
z_pre, f_pre, o_pre = cell.linear([x, x_prev], gates=("z", "f", "o"), kernel="kernel", bias="bias")
f = sigmoid(f_pre)
new_c = f * c + (1 - f) * tanh(z_pre)
cell.update(c, new_c)
cell.update(x_prev, x)
cell.output(sigmoid(o_pre) * new_c)

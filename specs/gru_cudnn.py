"""The cuDNN / PyTorch ``nn.GRU`` cell: the reset gate multiplies the recurrent projection.

Gate column order r, z, n (PyTorch's). With PyTorch weights:
``input/kernel = weight_ih_l0.T``, ``input/bias = bias_ih_l0``,
``recurrent/kernel = weight_hh_l0.T``, ``recurrent/bias = bias_hh_l0``.

r  = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
z  = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
n  = tanh(x W_in + b_in + r * (h W_hn + b_hn))
h' = (1 - z) * n + z * h
"""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("gru_cudnn", doc=__doc__)
x = cell.input()
h = cell.state("h")
xr, xz, xn = cell.linear([x], gates=("xr", "xz", "xn"), kernel="input/kernel", bias="input/bias")
hr, hz, hn = cell.linear([h], gates=("hr", "hz", "hn"), kernel="recurrent/kernel", bias="recurrent/bias")
r = sigmoid(xr + hr)
z = sigmoid(xz + hz)
n = tanh(xn + r * hn)
new_h = (1 - z) * n + z * h
cell.update(h, new_h)
cell.output(new_h)

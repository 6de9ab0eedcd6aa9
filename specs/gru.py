"""TensorFlow 1.x GRUCell: the reset gate is applied to h *before* the candidate matmul.

r, u = sigmoid([x, h] @ gates/kernel + gates/bias)   (gate bias initialised to 1.0)
c    = tanh([x, r * h] @ candidate/kernel + candidate/bias)
h'   = u * h + (1 - u) * c
"""

from cellgen.dsl import Cell, sigmoid, tanh

cell = Cell("gru", doc=__doc__)
x = cell.input()
h = cell.state("h")
r_pre, u_pre = cell.linear([x, h], gates=("r_pre", "u_pre"), kernel="gates/kernel", bias="gates/bias",
                           bias_init=1.0)
r, u = sigmoid(r_pre), sigmoid(u_pre)
c = tanh(cell.linear([x, r * h], gates=("c_pre",), kernel="candidate/kernel", bias="candidate/bias"))
new_h = u * h + (1 - u) * c
cell.update(h, new_h)
cell.output(new_h)

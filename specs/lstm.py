"""TensorFlow 1.x LSTMCell with use_peepholes=True, cell_clip, num_proj and proj_clip.

State (c [num_units], h [num_proj]); ``cell_clip=inf`` / ``proj_clip=inf`` disable clipping.

i, j, f, o = [x, h] @ kernel + bias
c' = sigmoid(f + forget_bias + w_f_diag * c) * c + sigmoid(i + w_i_diag * c) * tanh(j)
c' = clip(c', -cell_clip, cell_clip)
m  = sigmoid(o + w_o_diag * c') * tanh(c')
h' = clip(m @ projection/kernel, -proj_clip, proj_clip)
"""

import math

from cellgen.dsl import Cell, Max, Min, sigmoid, tanh

cell = Cell("lstm", doc=__doc__)
num_proj = cell.size("num_proj")
x = cell.input()
c = cell.state("c")
h = cell.state("h", size=num_proj)
forget_bias = cell.hyper("forget_bias", 1.0)
cell_clip = cell.hyper("cell_clip", math.inf)
proj_clip = cell.hyper("proj_clip", math.inf)
w_f_diag = cell.param("w_f_diag")
w_i_diag = cell.param("w_i_diag")
w_o_diag = cell.param("w_o_diag")
i, j, f, o = cell.linear([x, h], gates=("i", "j", "f", "o"), kernel="kernel", bias="bias")
new_c = sigmoid(f + forget_bias + w_f_diag * c) * c + sigmoid(i + w_i_diag * c) * tanh(j)
new_c = Min(Max(new_c, -cell_clip), cell_clip)
m = sigmoid(o + w_o_diag * new_c) * tanh(new_c)
proj = cell.linear([m], gates=("proj",), kernel="projection/kernel", bias=None, size=num_proj)
new_h = Min(Max(proj, -proj_clip), proj_clip)
cell.update(c, new_c)
cell.update(h, new_h)
cell.output(new_h)

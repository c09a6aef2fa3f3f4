"""Draw both sparsity patterns at Infinity 1024 for the README: docs/patterns.png.

Row 1, CSLA: the keys one query of scale 12 may see in each key scale (sinks whole, windows
7/5/3/1/1 from the finest scale back, scales 5-7 excluded). Row 2, CS4A: for one query group
of scale 12, its band ranges in scales 11 and 12 and the kept keys of its source decision group
(kept sets depend on the data; here q and k are position features, so attention is local).
"""

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

import sparvar.reference as R
from sparvar.autotune.quality import make_calibration

s = R.infinity_schedule()
plan = R.default_plan(s, 32)
step, qi, qj = 12, 20, 40
mask = R.csla_mask(s, step, plan.csla)[qi * 64 + qj]
make_calibration("/tmp/sparvar-patterns.pt", s, [0], heads=1, head_dim=32)
d = plan.decision_scale
q, k, v = (torch.load("/tmp/sparvar-patterns.pt")["layers"][0][d][n].double() for n in "qkv")
_, state = R.cs4a_decide(q, k, v, s, d, plan.cs4a, 32 ** -0.5)
G = (qi * 64 + qj) // plan.group_size
allowed = R.cs4a_mask(s, step, plan.cs4a, state.kept)[0, 0, qi * 64 + qj]

scales = [0, 2, 4, 8, 9, 10, 11, 12]
fig, axes = plt.subplots(2, len(scales), figsize=(2.1 * len(scales), 4.6))
for row, (m_all, title) in enumerate([(mask, "CSLA"), (allowed, f"CS4A (group {G})")]):
    for ax, m in zip(axes[row], scales):
        h, w = s.grids[m]
        img = m_all[s.offsets[m]:s.offsets[m + 1]].reshape(h, w).float()
        ax.imshow(img, cmap="Blues", vmin=0, vmax=1.3, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        ax.set_title(f"scale {m} ({h}x{w})", fontsize=8)
        if m == step and row == 0:
            ax.plot(qj, qi, "r+", ms=8)
    axes[row][0].set_ylabel(title, fontsize=10)
fig.suptitle(f"Keys one query of scale 12 at (y={qi}, x={qj}) may attend (blue), Infinity 1024 defaults", fontsize=10)
fig.tight_layout()
fig.savefig("docs/patterns.png", dpi=110)
print("wrote docs/patterns.png")

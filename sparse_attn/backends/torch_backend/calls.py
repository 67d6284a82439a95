"""`Call`: one kernel call's rows and key blocks, the unit the plan (`planning`) makes and the views
(`views`) read. Its own module, so that neither of those imports the other's types back."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Call:
    """One kernel call's rows and key blocks (all int64, on the CPU)."""

    rows: torch.Tensor  # [X] layout row ids (l * nqb + qb)
    full: torch.Tensor  # [X, nf] full key blocks, ascending
    part: torch.Tensor  # [X, np] partial key blocks
    tiles: torch.Tensor  # [X, np] tile ids of the partial blocks
    full_len: int  # keys in the full segment (nf * bk, less the ragged tail if the last block is in it)
    step: int  # > 0: full blocks of row x start at full[0, 0] + x * step (strided view); 0: gather
    merge: bool = False  # an earlier pass wrote these rows: merge into (forward) or add to (dQ) it

    def subset(self, sel, step: int | None = None) -> Call:
        """The same call restricted to rows `sel` (a slice or a bool mask), optionally with another step."""
        step = self.step if step is None else step
        return Call(
            self.rows[sel], self.full[sel], self.part[sel], self.tiles[sel], self.full_len, step, self.merge
        )

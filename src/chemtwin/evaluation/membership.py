"""Open-cluster validation on real stars: a membership table as the twin groups.

A membership table (e.g. OCCAM's member catalogue) names, per APOGEE_ID, the cluster a star
belongs to; read with ``astropy.table.Table.read`` (FITS, CSV, ECSV, ... from the extension).
Stars of the tagged set that are not in the table are **field stars** (group -1).  Members of
one cluster become one twin group, so the doppelganger ranks of ``chemtwin.core.ranks`` apply
unchanged: the rank of member ``i`` with respect to member ``j`` of its cluster is the number
of stars outside the cluster (field stars and members of other clusters) whose tag is at least
as close to ``i`` as ``j``'s (docs/workflow.md).

``cluster_summary`` reports, per cluster: ``n_members`` (in the table), ``n_found`` (among the
tagged stars), ``n_pairs`` (ordered member pairs), the rank fractions of
``chemtwin.evaluation.metrics.rank_fractions`` over its pairs, and ``doppelganger_rate``: the
mean over its pairs of rank / (number of stars outside the cluster), i.e. the fraction of
non-members that look at least as similar to a member as a fellow member does.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.table import Table

from chemtwin.core.files import describe_error
from chemtwin.core.ranks import RankResult
from chemtwin.errors import InputError
from chemtwin.evaluation.metrics import rank_fractions

ID_COLUMN = "APOGEE_ID"
CLUSTER_COLUMN = "CLUSTER"  # OCCAM's name for it


@dataclass
class Membership:
    """Cluster name of each member star; ``names`` sorted, the group id of a cluster is its index."""

    path: str
    cluster_column: str
    members: dict  # {APOGEE_ID: cluster name}
    names: list

    def groups(self, star_ids) -> np.ndarray:
        """Group id per star (index into ``names``), -1 for field stars."""
        index = {name: k for k, name in enumerate(self.names)}
        return np.array([index.get(self.members.get(str(s).strip(), ""), -1) for s in star_ids], np.int64)

    def counts(self) -> dict:
        out = dict.fromkeys(self.names, 0)
        for name in self.members.values():
            out[name] += 1
        return out


def _text(column) -> np.ndarray:
    values = np.asarray(column)
    if values.dtype.kind == "S":
        values = np.char.decode(values, "utf-8", errors="replace")
    return np.char.strip(values.astype(str))


def read_membership(path: str | os.PathLike, cluster_column: str = CLUSTER_COLUMN) -> Membership:
    """The table at ``path``: columns APOGEE_ID and ``cluster_column`` (case-insensitive).
    InputError naming the file for a missing file, an unreadable table or a missing column;
    a star listed in two clusters is an error too."""
    if not Path(path).is_file():
        raise InputError(f"membership table {path}: no such file")
    try:
        table = Table.read(path)
    except Exception as exc:
        raise InputError(f"membership table {path}: unreadable ({describe_error(exc, 120)})") from None
    upper = {c.upper(): c for c in table.colnames}
    for name, what in ((ID_COLUMN, "the stars"), (cluster_column.upper(), "the cluster names")):
        if name not in upper:
            raise InputError(f"membership table {path}: has no {name} column ({what}); columns: "
                             f"{', '.join(table.colnames[:12]) or 'none'}")
    ids = _text(table[upper[ID_COLUMN]])
    clusters = _text(table[upper[cluster_column.upper()]])
    members: dict = {}
    for star, name in zip(ids.tolist(), clusters.tolist()):
        if not star or not name:
            continue
        if members.setdefault(star, name) != name:
            raise InputError(f"membership table {path}: {star} is listed in {members[star]} and in {name}")
    if not members:
        raise InputError(f"membership table {path}: no star with an {ID_COLUMN} and a cluster name")
    return Membership(str(path), upper[cluster_column.upper()], members, sorted(set(members.values())))


def cluster_summary(result: RankResult, group: np.ndarray, membership: Membership) -> list[dict]:
    """Per cluster of ``membership``: counts, rank fractions and ``doppelganger_rate`` (module
    docstring) over the ranks ``result`` of tags grouped by ``group`` (the ranked stars' groups)."""
    group = np.asarray(group, np.int64)
    found = np.bincount(group[group >= 0], minlength=len(membership.names))
    in_table = membership.counts()
    n = result.n_stars
    out = []
    for k, name in enumerate(membership.names):
        entry = {"cluster": name, "n_members": int(in_table[name]), "n_found": int(found[k])}
        pairs = group[result.query] == k
        entry["n_pairs"] = int(pairs.sum())
        if entry["n_pairs"]:
            ranks = result.rank[pairs]
            entry.update(rank_fractions(ranks, n))
            entry["doppelganger_rate"] = float(np.mean(ranks / max(n - int(found[k]), 1)))
        else:
            entry.update({"frac_rank0": None, "frac_rank_lt_0p1pct": None, "frac_rank_lt_1pct": None,
                          "median_rank": None, "doppelganger_rate": None})
        out.append(entry)
    return out

"""``chemtwin index`` and ``chemtwin search``: build a twin index, query it.

    chemtwin index LATENTS.h5 --out INDEX [--metric l1|l2] [--kind flat|hnsw|ivf]
    chemtwin search INDEX --star 2M17335483-2753043 -k 10
    chemtwin search INDEX --query OTHER_LATENTS.h5 -k 10 --json twins.json
    chemtwin search INDEX --star ID -k 10 --out twins.fits      # or .ecsv, .h5 (astropy tables)
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from chemtwin.cli.arguments import CommaList, positive_int, seed, thread_count, wants_progress
from chemtwin.core.files import atomic_output, prepare_output
from chemtwin.errors import InputError
from chemtwin.search.index import (
    HNSW_EF_CONSTRUCTION,
    HNSW_EF_SEARCH,
    HNSW_M,
    KINDS,
    METRICS,
    TwinIndex,
)
from chemtwin.search.index_folder import prepare_index_folder
from chemtwin.search.latents import DEFAULT_CHUNK_ROWS, open_latents
from chemtwin.search.tables import FORMATS, output_format, search_table, write_table

log = logging.getLogger(__name__)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "index", help="build a twin-search index from a latent file",
        description="Build a FAISS index over the latents of LATENTS.h5 (the layout `chemtwin embed` writes), "
                    "reading the file in chunks, and save it to the folder --out.",
    )
    p.add_argument("latents", help="latent file (.h5 with z (N,d), optional star_id, group)")
    p.add_argument("--out", required=True, help="index folder to write (index.faiss, meta.json, ids.npz)")
    p.add_argument("--metric", choices=sorted(METRICS), default="l1", help="distance between latents (default l1, the twin metric)")
    p.add_argument("--kind", choices=KINDS, default="flat",
                   help="flat = exact (default; fine up to a few million stars); hnsw / ivf = approximate, for larger catalogues")
    p.add_argument("--M", dest="M", type=positive_int, default=HNSW_M, help=f"hnsw: links per node (default {HNSW_M})")
    p.add_argument("--ef-construction", type=positive_int, default=HNSW_EF_CONSTRUCTION,
                   help=f"hnsw: candidate list while building (default {HNSW_EF_CONSTRUCTION})")
    p.add_argument("--ef-search", type=positive_int, default=HNSW_EF_SEARCH,
                   help=f"hnsw: candidate list while searching, raised to at least k (default {HNSW_EF_SEARCH})")
    p.add_argument("--nlist", type=positive_int, default=None, help="ivf: number of k-means cells (default about sqrt(N))")
    p.add_argument("--nprobe", type=positive_int, default=None, help="ivf: cells visited per query (default nlist/16, at least 16)")
    p.add_argument("--chunk-rows", type=positive_int, default=DEFAULT_CHUNK_ROWS, help=f"stars read per chunk (default {DEFAULT_CHUNK_ROWS})")
    p.add_argument("--threads", type=thread_count, default=None, help="FAISS threads (default: all cores)")
    p.add_argument("--seed", type=seed, default=0, help="seed of the ivf training sample and k-means (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.set_defaults(func=run_index)

    s = subparsers.add_parser(
        "search", help="find the nearest chemical twins in an index",
        description="Print the k nearest stars (smallest latent distance) of stars in the index (--star, "
                    "the star itself excluded) or of the latents in a query file (--query).",
    )
    s.add_argument("index", help="index folder written by `chemtwin index`")
    what = s.add_mutually_exclusive_group(required=True)
    what.add_argument("--query", metavar="FILE.h5", help="latent file whose stars are the queries (same latent dimension)")
    what.add_argument("--star", metavar="ID", action=CommaList,
                      help="star id(s) in the index (row numbers if it keeps none), comma-separated: --star A,B (also --star A B)")
    s.add_argument("-k", type=positive_int, default=10, help="neighbours per query (default 10)")
    s.add_argument("--json", metavar="OUT", default=None, help="also write the neighbours to this JSON file")
    s.add_argument("--out", metavar="TABLE", default=None,
                   help="also write the neighbours as a table, one row per (query, neighbour): FITS (.fits), ECSV "
                        "(.ecsv) or HDF5 (.h5), each read by astropy's Table.read(TABLE) and TOPCAT; a .json name "
                        "writes what --json writes")
    s.add_argument("--format", choices=FORMATS, default=None, help="format of --out (default: from its suffix, else hdf5)")
    s.add_argument("--show", type=int, default=50, help="print the tables of at most this many queries (default 50, -1 = all; all go to --json)")
    s.add_argument("--nprobe", type=positive_int, default=None, help="ivf: override the cells visited per query")
    s.add_argument("--ef-search", type=positive_int, default=None, help="hnsw: override the search candidate list")
    s.add_argument("--threads", type=thread_count, default=None, help="FAISS threads (default: all cores)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing --json or --out file")
    s.set_defaults(func=run_search)


def _threads(n: int | None) -> None:
    if n:
        import faiss

        faiss.omp_set_num_threads(int(n))


def run_index(args) -> int:
    out = prepare_index_folder(args.out, args.overwrite)
    _threads(args.threads)
    t0 = time.perf_counter()
    index = TwinIndex.from_file(
        args.latents, metric=args.metric, kind=args.kind, chunk_rows=args.chunk_rows, seed=args.seed,
        progress=wants_progress(args),
        M=args.M, ef_construction=args.ef_construction, ef_search=args.ef_search, nlist=args.nlist, nprobe=args.nprobe,
    )
    index.save(out, overwrite=args.overwrite)
    print(f"indexed {index.ntotal} stars ({index.dim}-d latents, {index.metric}, {index.kind}) "
          f"-> {out}  [{time.perf_counter() - t0:.1f} s]")
    if index.kind == "hnsw":
        print(f"hnsw: M={index.M} ef_construction={index.ef_construction} ef_search={index.ef_search}")
    elif index.kind == "ivf":
        print(f"ivf: nlist={index.nlist} nprobe={index.nprobe}")
    return 0


def _format_distance(d: float) -> str:
    return "-" if not np.isfinite(d) else f"{d:.6g}"


def run_search(args) -> int:
    if args.out and args.json is None and args.format is None and str(args.out).lower().endswith(".json"):
        args.json, args.out = args.out, None  # -o/--out OUT.json: the JSON list of neighbours
    json_path = prepare_output(args.json, args.overwrite, inputs=(args.index,)) if args.json else None
    if args.format is not None and not args.out:
        raise InputError("--format applies to --out (the table of neighbours)")
    table_path = prepare_output(args.out, args.overwrite, inputs=(args.index, *filter(None, (args.query,)))) if args.out else None
    fmt = output_format(args.out, args.format) if args.out else None
    if table_path is not None and json_path is not None and table_path.resolve() == json_path.resolve():
        raise InputError(f"--out and --json name the same file {table_path}")
    _threads(args.threads)
    index = TwinIndex.load(args.index)
    if args.nprobe is not None:
        if index.kind != "ivf":
            raise InputError("--nprobe applies to ivf indexes only")
        index.nprobe = args.nprobe
    if args.ef_search is not None:
        if index.kind != "hnsw":
            raise InputError("--ef-search applies to hnsw indexes only")
        index.ef_search = args.ef_search
    k = args.k
    groups = index.group
    query_flags = None
    if args.star:
        names = np.asarray(args.star, dtype=str)
        query_rows = index.rows_of(names)
        query_group = groups[query_rows] if groups is not None else None
        dist, rows = index.search_ids(names, k)
        source = "index"
    else:
        with open_latents(args.query) as lf:
            if lf.dim != index.dim:
                raise InputError(f"{args.query}: latents have dimension {lf.dim}, the index has {index.dim}")
            if lf.n_stars == 0:
                raise InputError(f"{args.query}: holds no latents")
            z = lf.read()
            ids = lf.star_id()
            names = ids if ids is not None else np.array([f"row {i}" for i in range(lf.n_stars)])
            # Group numbers of another file need not match the index's: no "same group" marks.
            query_group = None
            query_flags = lf.column("flags") if hasattr(lf, "column") else None
        dist, rows = index.search(z, k)
        source = str(args.query)
    nbr_ids = index.ids_of(rows)
    nbr_group = np.where(rows >= 0, groups[np.clip(rows, 0, None)], -1) if groups is not None else None

    print(f"index {args.index}: {index.ntotal} stars, {index.dim}-d, {index.metric}, {index.kind}; "
          f"{len(names)} quer{'y' if len(names) == 1 else 'ies'} from {source}, k={k}")
    show = len(names) if args.show < 0 else min(args.show, len(names))
    id_width = max([len(s) for s in nbr_ids[:show].ravel()] + [7])
    for q in range(show):
        head = f"\n{names[q]}"
        if query_group is not None and query_group[q] >= 0:
            head += f"  (group {query_group[q]}; * = same group)"
        print(head)
        cols = f"  {'rank':>4}  {'star_id':<{id_width}}  {'distance':>12}"
        print(cols + ("  group" if nbr_group is not None else ""))
        for j in range(k):
            if rows[q, j] < 0:
                break
            line = f"  {j + 1:>4}  {nbr_ids[q, j]:<{id_width}}  {_format_distance(dist[q, j]):>12}"
            if nbr_group is not None:
                g = int(nbr_group[q, j])
                same = query_group is not None and query_group[q] >= 0 and g == query_group[q]
                line += f"  {g if g >= 0 else '-'}{' *' if same else ''}"
            print(line)
    if show < len(names):
        print(f"\n... {len(names) - show} more queries not shown" + ("" if json_path else " (use --json OUT or --show)"))

    if json_path:
        result = {
            "index": str(args.index), "metric": index.metric, "kind": index.kind, "k": k,
            "distance": "sum |dz|" if index.metric == "l1" else "Euclidean",
            "queries": [],
        }
        for q in range(len(names)):
            valid = rows[q] >= 0
            entry = {"query": str(names[q])}
            if query_group is not None:
                entry["group"] = int(query_group[q])
            entry["neighbours"] = [
                {"star_id": str(nbr_ids[q, j]), "row": int(rows[q, j]), "distance": float(dist[q, j]),
                 **({"group": int(nbr_group[q, j])} if nbr_group is not None else {})}
                for j in np.flatnonzero(valid)
            ]
            result["queries"].append(entry)
        with atomic_output(json_path) as tmp:
            tmp.write_text(json.dumps(result, indent=1) + "\n")
        print(f"\nwrote {json_path}")
    if table_path:
        meta = {"index": str(args.index), "metric": index.metric, "kind": index.kind, "k": k, "queries_from": source}
        write_table(search_table(names, nbr_ids, rows, dist, query_group=query_group, nbr_group=nbr_group,
                                 query_flags=query_flags, meta=meta), table_path, fmt, overwrite=args.overwrite)
        print(f"\nwrote {table_path}")
    return 0

"""Twin search (FAISS) and blind clustering of latents; see docs/search.md.

* ``chemtwin.search.latents``  reading latent files (``chemtwin embed`` output) in chunks
* ``chemtwin.search.index``    ``TwinIndex``: exact / approximate nearest-twin search
* ``chemtwin.search.cluster``  Ward (twin-free cut), HDBSCAN and DBSCAN clustering of latents
* ``chemtwin.search.cluster_metrics``  purity, completeness and recovered groups against known groups
"""

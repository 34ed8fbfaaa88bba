"""Twin search (FAISS) and blind clustering of latents; see docs/search.md.

* ``chemtwin.search.latents``  reading latent files (``chemtwin embed`` output) in chunks
* ``chemtwin.search.index``    ``TwinIndex``: exact / approximate nearest-twin search
* ``chemtwin.search.cluster``  HDBSCAN / DBSCAN clustering and its purity/completeness metrics
"""

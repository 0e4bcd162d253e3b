"""Content store: content-addressed blobs on disk, ingests, and the namespaced view.

- ``store``: domain types (``Info``, ``Status``) and digest validation;
- ``local``: the on-disk backend (``LocalStore``), synchronous, one thread hop per call;
- ``metadata``: ``NamespacedContentStore``, the async per-namespace view every service uses.
"""

"""Images into the daemon: its own pull (the ``Pull`` service, :mod:`.pull`), and layers
unpacked while their blobs arrive (:mod:`.staging`, with the :mod:`.unpacker` process)."""

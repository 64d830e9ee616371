"""The datastore format (docs/architecture.md, "The datastore"): chunks and their codec, an
image's manifest, index and side files, the store's layout and locks, and the catalog that
lists it. Knows disks only by their ids, partition tables and byte ranges."""

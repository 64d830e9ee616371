"""The imaging engine: deduplicated whole-disk images in a datastore.

Pure Python with no Django import, so it runs alone (`python -m imaging`) from
a rescue system as well as inside the web dashboard's workers.

Each verb (backup, restore, verify, export, importer, recompress, prune, gc, rehome, sync) is a
module here, beside the command line (cli, report) and restore's own checks (fit, safety).
They stand on, from the top down: reading/ (images read in place), datastore/ (the
format), disks/ (the host's disks) and base/; a layer imports only those below it
(.importlinter holds the rule, `make test` checks it).
"""

"""The imaging engine: deduplicated whole-disk images in a datastore.

Pure Python with no Django import, so it runs alone (`python -m imaging`) from
a rescue system as well as inside the web dashboard's workers.
"""

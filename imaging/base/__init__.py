"""What every other part of the engine stands on: its errors, progress events, the
read-compress-write pipeline, Linux calls Python lacks, and the one runner of the host's
tools (with coreutils' size and split-name rules). Imports nothing else of the engine."""

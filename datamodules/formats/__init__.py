"""On-disk layouts, read and written: raw official files served as chunk urls (:mod:`.raw`), the official files'
converters (:mod:`.converters`), downloaded-image folders (:mod:`.downloads`), Donut's folder layout
(:mod:`.donut_folder`) and the one shard writer (:mod:`.shards`)."""

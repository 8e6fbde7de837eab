"""The ``mmlm data`` tools, each registered one way (``add_data_tools`` per module, listed in
``mmlm.app.data.DATA_TOOL_MODULES``): general shard tools (:mod:`.general`, :mod:`.make_shards`), documents, interleaved
documents, embodied and pair data sets, and the output-folder rules every tool follows (:mod:`.outputs`)."""

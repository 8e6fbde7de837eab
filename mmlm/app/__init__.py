"""The application layer: the ``mmlm`` command (:mod:`~mmlm.app.cli`), LightningCLI with mmlm's defaults
(:mod:`~mmlm.app.lightning`), the data tools (:mod:`~mmlm.app.data`), the main job (:mod:`~mmlm.app.quickstart`), the
tiny recipes' shared driver (:mod:`~mmlm.app.recipes`), feature caching (:mod:`~mmlm.app.features`) and the run
checks and callbacks (:mod:`~mmlm.app.reliability`). Nothing in the library below imports it."""

"""The jacquant application: the ``jacquant`` command, the main job's tracks and report, corpus handling and
the train/eval/export workflow. It imports the library (:mod:`jacquant`); the library never imports it."""

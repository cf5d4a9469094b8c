"""ControlNet for the SD3 family: files (:mod:`.files`), control images (:mod:`.image`, :mod:`.preprocess`)
and their residuals during sampling (:mod:`.apply`)."""

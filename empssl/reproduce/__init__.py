"""``empssl reproduce``: the paper's experiments as resumable sweeps of normal run folders (``sweep``), the
published numbers they are read against (``published``) and the report (``report``)."""

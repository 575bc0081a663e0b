"""``npcchat eval``: scenario files (``scenarios``), metrics (``metrics``), reply similarity
(``similarity``), the run (``runner``: scenarios as conversations side by side), the JSON
report and its gates (``report``) and the HTML page (``html``).
"""

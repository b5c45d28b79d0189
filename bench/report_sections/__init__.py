"""The parts of ``bench/report.py``'s report; that script's docstring says what each section shows.

- :mod:`.inputs`: finding, reading and recognising the bench JSON; machine labels; input errors;
- :mod:`.tables` and :mod:`.plots`: the markdown tables and the matplotlib figures every section uses;
- one module per section: :mod:`.loss`, :mod:`.distributed`, :mod:`.adapter`, :mod:`.embed`,
  :mod:`.train_steps` (stage 1 and stage 2), :mod:`.other`, :mod:`.gpu_check_output`;
- :mod:`.document`: ``report.md`` itself (header, contents, the sections in order).
"""

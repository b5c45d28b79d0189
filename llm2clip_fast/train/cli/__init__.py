"""The trainer's command-line plumbing: flags shared by the sub-commands (``--device``,
``--precision``, old spellings), ``--config`` files, ``--recipe`` tables, the packages the
trainer needs, and how the command lines log. The sub-commands themselves live one level up."""

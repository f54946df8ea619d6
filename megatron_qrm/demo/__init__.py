"""`qrm demo`: Q-RM end to end on a CPU, on a synthetic task the project generates itself.

* :mod:`.task`: chained arithmetic with a known first error (checker, generators; registers ``arith``);
* :mod:`.tokenizer`: a SentencePiece tokenizer trained on the task text;
* :mod:`.pairs`: `qrm make-pairs` (sampled responses + labels -> preference pairs);
* :mod:`.pipeline`: the stages (data, SFT, pairs, RMs, RL, localisation, report), resumable;
* :mod:`.localization`: does the lowest-credit step sit on the first wrong step?
* :mod:`.report`: report.md / report.json / PNG plots; :mod:`.study`: several seeds;
* :mod:`.cli`: the `demo` and `make-pairs` subcommands.
"""

"""`python -m deepseek_vl ...` is the `deepseek-vl2` command."""

from deepseek_vl.serve.cli import main

raise SystemExit(main())

from stvfm_engine.cli import main

raise SystemExit(main())

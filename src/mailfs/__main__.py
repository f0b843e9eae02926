from mailfs.cli import main

raise SystemExit(main())

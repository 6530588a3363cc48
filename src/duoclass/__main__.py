from duoclass.cli.commands import main

raise SystemExit(main())

from db.cli import main

raise SystemExit(main())

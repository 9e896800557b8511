from vramtrace.cli import main

main()

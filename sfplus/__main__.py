from sfplus.cli import main

main()

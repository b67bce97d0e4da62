from aisemble.cli import main

main()

//go:build tools

// Package tools pins github.com/johannesboyne/gofakes3/cmd/gofakes3: the second S3 server the
// end-to-end S3 test runs against (MIT; a module of its own so its dependencies never move the
// control plane's in ../go.mod).
package tools

import _ "github.com/johannesboyne/gofakes3/cmd/gofakes3"

module github.com/nbdcache/nbdcache

go 1.26

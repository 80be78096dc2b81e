// Azure AI Search for the production knowledge index. Keyless: API keys are off
// (disableLocalAuth), so only Entra identities with a Search data role can query or write.
// The app's identity may only read (Index Data Reader, scoped to this service): the app
// has no Search knowledge backend yet, and once it has, writing to the index is the
// ingestion identity's job, not the serving app's.

param name string
param location string
param tags object

@allowed([ 'basic', 'standard', 'standard2', 'standard3', 'storage_optimized_l1', 'storage_optimized_l2' ])
param sku string

@minValue(1)
@maxValue(12)
param replicaCount int

@minValue(1)
@maxValue(12)
param partitionCount int

@allowed([ 'disabled', 'free', 'standard' ])
@description('Semantic ranker plan.')
param semanticSearch string

@description('Principal (object) id of the app\'s managed identity.')
param principalId string

var searchIndexDataReader = '1407120a-92aa-4202-b7e9-c0e197c71c8f'

resource search 'Microsoft.Search/searchServices@2023-11-01' = {
  name: name
  location: location
  tags: tags
  sku: { name: sku }
  properties: {
    replicaCount: replicaCount
    partitionCount: partitionCount
    hostingMode: 'default'
    // Keys off: authOptions must then be absent (it only chooses between key modes).
    disableLocalAuth: true
    semanticSearch: semanticSearch
    publicNetworkAccess: 'enabled'
  }
}

resource indexAccess 'Microsoft.Authorization/roleAssignments@2022-04-01' = {
  name: guid(search.id, principalId, searchIndexDataReader)
  scope: search
  properties: {
    roleDefinitionId: subscriptionResourceId('Microsoft.Authorization/roleDefinitions', searchIndexDataReader)
    principalId: principalId
    principalType: 'ServicePrincipal'
  }
}

output endpoint string = 'https://${search.name}.search.windows.net'
output name string = search.name
